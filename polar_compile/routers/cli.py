"""``polar-compile calibrate MODEL --out routers.safetensors``: calibrate and save routers, print recall."""

from __future__ import annotations

import argparse
import time


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


def run_calibrate(args) -> int:
    from polar_compile.config import CalibrationConfig
    from polar_compile.routers.calibrate import calibrate
    from polar_compile.routers.io import save_routers

    model, tokenizer = _load_model(args.model, args.mha)
    num_groups = model.config.num_key_value_heads or model.config.num_attention_heads
    density = args.density if args.density is not None else (2 / 3 if num_groups == 3 else 0.5)
    config = CalibrationConfig(
        tokens=args.tokens, density=density, mlp={True: "on", False: "off", None: "auto"}[args.mlp], epochs=args.epochs
    )
    start = time.perf_counter()
    routers = calibrate(model, None, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    save_routers(routers, args.out)
    meta = routers.metadata
    print(f"\nlayer  recall@{meta['k']} of {routers.num_groups} groups   (random router: {meta['random_recall']:.3f})")
    for layer, recall in meta["recall"].items():
        mlp = meta["mlp_recall"].get(layer)
        print(f"{int(layer):>5}  {recall:.4f}" + (f"   mlp recall {mlp:.4f}" if mlp is not None else ""))
    recalls = list(meta["recall"].values())
    print(f"mean {sum(recalls) / len(recalls):.4f} over layers {meta['layers'][0]}..{meta['layers'][-1]}")
    print(f"{meta['calibration_tokens']} tokens, {seconds:.0f} s; wrote {args.out}")
    return 0


def add_calibrate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help='a model folder (HF format) or "smollm2" for the shipped SmolLM2-135M')
    parser.add_argument("--out", required=True, help="router file to write (.safetensors)")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--density", type=float, help="attention density (default 2/3 for 3 groups, else 0.5)")
    parser.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None, help="default: ReLU MLPs only")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mha", action="store_true", help="expand KV heads first: each query head its own group")
    parser.set_defaults(func=run_calibrate)
