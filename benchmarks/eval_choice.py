"""One multiple-choice task through the compiled decode path, with more questions than `polar-compile eval` runs.

    python benchmarks/eval_choice.py --routers mha_routers.safetensors --mha --density 0.8889 --questions 600
    python benchmarks/eval_choice.py --routers polar_compile/data/smollm2_routers.safetensors --density 0.6667 \
        --questions all --out choice.json            # then other settings against the same dense answers:
    python benchmarks/eval_choice.py ... --dense-layers 0,11,12 --dense-from choice.json --out choice_b.json

For settling a paired change that 150 questions leave open (e.g. continuation choice at 8 of 9 heads on the
MHA-expanded SmolLM2: -2.7 points [-5.8, +0.5] at 150). Same questions (seed 0: the first 150 are `eval`'s; "all":
every test-split article with two sentences, 937), dense then polar on the same model, CPU (fp32) or GPU (bf16);
prints both accuracies and the paired change with its 95% CI. --out keeps every question's outcome (1/0) for both
systems; --dense-from takes the dense outcomes from such a file (same task, questions, variant and device) instead
of scoring dense again.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from polar_compile.evaluate import parse_questions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", required=True)
    parser.add_argument("--density", type=float, required=True)
    parser.add_argument("--mha", action="store_true", help="expand KV heads first (each query head its own group)")
    parser.add_argument("--task", choices=("title", "continuation"), default="continuation")
    parser.add_argument("--questions", type=parse_questions, default=600, help='how many questions, or "all"')
    parser.add_argument("--dense-layers", help="layers kept dense (comma list; default: the router file's choice)")
    parser.add_argument("--dense-from", help="a JSON written by --out: take the dense outcomes from it")
    parser.add_argument("--out", help="write every question's outcome for both systems to this JSON")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    import polar_compile
    from polar_compile.assets import load_smollm2, load_wiki_records
    from polar_compile.config import SparsityConfig
    from polar_compile.evaluate import (
        Estimate,
        build_multiple_choice,
        multiple_choice_accuracy,
        paired_change,
        parse_layers,
    )

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, tokenizer = load_smollm2(dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    if args.mha:
        from polar_compile.mha import expand_kv_heads

        expand_kv_heads(model)
    routers = polar_compile.load_routers(args.routers, model)
    questions = build_multiple_choice(load_wiki_records("test"), args.task, questions=args.questions)
    setup = {"task": args.task, "questions": len(questions), "mha": args.mha, "device": device}
    start = time.perf_counter()
    if args.dense_from:
        with open(args.dense_from) as handle:
            saved = json.load(handle)
        if {key: saved.get(key) for key in setup} != setup:
            scored = {key: saved.get(key) for key in setup}
            raise SystemExit(f"{args.dense_from} was scored for {scored}, not for {setup}")
        outcomes = saved["dense"]
        dense = Estimate(sum(outcomes) / len(outcomes), 0.0, 1.0, len(outcomes), tuple(outcomes))
        print(f"dense: {100 * dense.value:.1f}% over {dense.count} questions (from {args.dense_from})")
    else:
        dense = multiple_choice_accuracy(model, tokenizer, questions)
        print(f"dense: {100 * dense.value:.1f}% over {dense.count} questions ({time.perf_counter() - start:.0f} s)")
    dense_layers = parse_layers(args.dense_layers) if args.dense_layers else None
    config = SparsityConfig(attention_density=args.density, dense_layers=dense_layers)
    polar_compile.optimize(model, routers, config)
    kept = list(config.resolve_dense_layers(routers).dense_layers)
    start = time.perf_counter()
    sparse = multiple_choice_accuracy(model, tokenizer, questions)
    print(f"polar {args.density}, dense layers {kept}: {100 * sparse.value:.1f}% ({time.perf_counter() - start:.0f} s)")
    change, low, high = paired_change(sparse, dense)
    print(f"{args.task}: {change:+.1f} points [{low:+.1f}, {high:+.1f}] (95% CI, paired, {dense.count} questions)")
    if args.out:
        record = {**setup, "routers": args.routers, "density": args.density, "dense_layers": kept}
        record.update(change_points=[change, low, high], dense=list(dense.items), polar=list(sparse.items))
        with open(args.out, "w") as handle:
            json.dump(record, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
