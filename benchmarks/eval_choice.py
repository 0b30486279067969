"""One multiple-choice task through the compiled decode path, with more questions than `polar-compile eval` runs.

    python benchmarks/eval_choice.py --routers mha_routers.safetensors --mha --density 0.8889 --questions 600

For settling a paired change that 150 questions leave open (e.g. continuation choice at 8 of 9 heads on the
MHA-expanded SmolLM2: -2.7 points [-5.8, +0.5] at 150). Same questions (seed 0: the first 150 are `eval`'s), dense
then polar on the same model, CPU (fp32) or GPU (bf16); prints both accuracies and the paired change with its 95% CI.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", required=True)
    parser.add_argument("--density", type=float, required=True)
    parser.add_argument("--mha", action="store_true", help="expand KV heads first (each query head its own group)")
    parser.add_argument("--task", choices=("title", "continuation"), default="continuation")
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    import polar_compile
    from polar_compile.assets import load_smollm2, load_wiki_records
    from polar_compile.config import SparsityConfig
    from polar_compile.evaluate import build_multiple_choice, multiple_choice_accuracy, paired_change

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, tokenizer = load_smollm2(dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    if args.mha:
        from polar_compile.mha import expand_kv_heads

        expand_kv_heads(model)
    routers = polar_compile.load_routers(args.routers, model)
    questions = build_multiple_choice(load_wiki_records("test"), args.task, questions=args.questions)
    start = time.perf_counter()
    dense = multiple_choice_accuracy(model, tokenizer, questions)
    print(f"dense: {100 * dense.value:.1f}% over {dense.count} questions ({time.perf_counter() - start:.0f} s)")
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=args.density))
    start = time.perf_counter()
    sparse = multiple_choice_accuracy(model, tokenizer, questions)
    print(f"polar {args.density}: {100 * sparse.value:.1f}% ({time.perf_counter() - start:.0f} s)")
    change, low, high = paired_change(sparse, dense)
    print(f"{args.task}: {change:+.1f} points [{low:+.1f}, {high:+.1f}] (95% CI, paired, {dense.count} questions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
