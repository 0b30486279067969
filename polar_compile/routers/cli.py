"""``polar-compile calibrate MODEL --out routers.safetensors``: calibrate routers, save them, print recall per layer."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def default_density(num_heads: int, num_groups: int) -> float:
    """MHA: half the heads (the paper's setting for 7B-13B models). GQA: the fewest groups that are more than
    half of them (5 of 8 as in the paper for Llama-3.1; 2 of 3 for SmolLM2), or half of 2."""
    if num_groups == num_heads or num_groups < 3:
        return 0.5
    return (num_groups // 2 + 1) / num_groups


def _load_model(name: str, mha: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from polar_compile.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa").eval()
        if torch.cuda.is_available():
            model = model.to("cuda", torch.bfloat16)
    if mha:
        from polar_compile.mha import expand_kv_heads

        expand_kv_heads(model)
    return model, tokenizer


def _read_texts(path: str) -> list[str]:
    """A text file: documents separated by blank lines."""
    text = Path(path).read_text(encoding="utf-8")
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def run_calibrate(args) -> int:
    from polar_compile.config import CalibrationConfig
    from polar_compile.model_info import describe_model
    from polar_compile.routers.calibrate import calibrate
    from polar_compile.routers.io import save_routers

    model, tokenizer = _load_model(args.model, args.mha)
    info = describe_model(model)
    density = args.density if args.density is not None else default_density(info.num_heads, info.num_groups)
    config = CalibrationConfig(
        tokens=args.tokens,
        density=density,
        mlp={True: "on", False: "off", None: "auto"}[args.mlp],
        epochs=args.epochs,
        learning_rate=args.lr,
        seed=args.seed,
        label=args.label,
    )
    texts = _read_texts(args.text_file) if args.text_file else None
    start = time.perf_counter()
    routers = calibrate(model, texts, config, tokenizer=tokenizer, progress=not args.quiet)
    seconds = time.perf_counter() - start
    save_routers(routers, args.out)
    meta = routers.metadata
    print(f"\n{info.architecture}: {info.num_layers} layers, {info.num_heads} query heads, {info.num_groups} groups")
    print(f"held-out recall@{meta['k']} of {meta['num_groups']} groups (density {density:.4g}); random router:")
    print(f"{meta['random_recall']:.3f} expected\n")
    print(f"{'layer':>5}  {'recall':>7}  {'untrained':>9}" + ("  mlp recall  k@1  k@64" if meta["mlp_recall"] else ""))
    for layer, recall in meta["recall"].items():
        row = f"{int(layer):>5}  {recall:>7.4f}  {meta['untrained_recall'][layer]:>9.4f}"
        if layer in meta["mlp_recall"]:
            ks = [routers.mlp_k(int(layer), batch) for batch in (1, 64)]
            row += f"  {meta['mlp_recall'][layer]:>10.4f}" + "".join(f"  {'dense' if k is None else k:>4}" for k in ks)
        print(row)
    recalls = list(meta["recall"].values())
    print(f" mean  {sum(recalls) / len(recalls):>7.4f}  (layers {meta['layers'][0]}..{meta['layers'][-1]})")
    print(
        f"\n{meta['calibration_tokens']} tokens; collect {meta['seconds']['collect']:.0f} s, "
        f"train {meta['seconds']['train']:.0f} s, total {seconds:.0f} s; wrote {args.out} "
        f"({Path(args.out).stat().st_size / 1024:.0f} KiB)"
    )
    return 0


def add_calibrate_parser(parser: argparse.ArgumentParser) -> None:
    from polar_compile.config import CalibrationConfig

    defaults = CalibrationConfig()
    parser.add_argument(
        "model", help='a model folder or hub name (HF format), or "smollm2" for the shipped SmolLM2-135M'
    )
    parser.add_argument("--out", required=True, help="router file to write (.safetensors)")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help=f"calibration tokens ({defaults.tokens})")
    parser.add_argument(
        "--density", type=float, help="attention density (default: 0.5 for MHA; GQA: just over half the groups)"
    )
    parser.add_argument(
        "--mlp", action=argparse.BooleanOptionalAction, default=None, help="MLP routers (default: ReLU MLPs only)"
    )
    parser.add_argument("--text-file", help="calibrate on this text (documents separated by blank lines); "
                        "default: the shipped Wikipedia train split")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"epochs per router ({defaults.epochs})")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help=f"AdamW ({defaults.learning_rate})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--label", choices=("pre", "post"), default=defaults.label,
                        help="group score for the attention label: the group's contribution norm after o_proj "
                        "(post, the default) or the head output norm before o_proj (pre, the paper's)")  # fmt: skip
    parser.add_argument("--mha", action="store_true", help="expand KV heads first: each query head its own group")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_calibrate)
