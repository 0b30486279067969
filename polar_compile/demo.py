"""``polar-compile demo``: SmolLM2-135M generating dense and sparse side by side.

Loads the real model (``load_smollm2``), the routers shipped for it (or calibrates new ones with
``--calibrate``), generates greedily for a few prompts with the dense model and then with the optimized
one, and prints both texts, the share of generated tokens that agree, and decode tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import time
from importlib import resources
from pathlib import Path

import torch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Photosynthesis is the process by which",
    "The Second World War ended in",
    "A prime number is",
)


def shipped_routers_path() -> Path:
    return Path(str(resources.files("polar_compile") / "data" / "smollm2_routers.safetensors"))


def _generate(model, inputs, new_tokens: int):
    """Greedy static-cache generate; returns (generated ids, decode seconds per step or None).

    The step time is the median over every decode step: the processor runs once per new token, the first time
    right after prefill, so n new tokens give n - 1 timed decode steps (None for one new token)."""
    from transformers import LogitsProcessorList

    stamps: list[float] = []

    def clock(input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return scores

    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        model.generate(**inputs, **kwargs)  # warm-up: compiles the decode step
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **kwargs)
    # stamps[0] follows prefill, stamps[i] decode step i: each difference is one decode step, the first included
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    step = sorted(steps)[len(steps) // 2] if steps else None
    return out[:, inputs["input_ids"].shape[1] :], step


def _check_before_loading(args) -> None:
    """What is wrong with the arguments, found before the model loads."""
    from polar_compile.config import CalibrationConfig, _check_density
    from polar_compile.routers.cli import check_token_budget

    if args.density is not None:
        _check_density("--density", args.density)
    if args.prompt is not None and any(not prompt.strip() for prompt in args.prompt):
        raise ValueError("--prompt needs some text: an empty prompt gives the model nothing to continue")
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if args.calibrate:
        if args.routers:
            raise ValueError("--routers and --calibrate exclude each other: use a router file or calibrate new routers")
        check_token_budget(
            CalibrationConfig(tokens=args.tokens, density=2 / 3 if args.density is None else args.density)
        )
    elif args.routers and not Path(args.routers).is_file():
        raise ValueError(f"--routers: no file at {args.routers}")


def run_demo(args) -> int:
    """The subcommand; a bad argument or router file ends it with one line naming the problem."""
    from polar_compile.assets import AssetError

    try:
        _check_before_loading(args)
        model, tokenizer, routers, source, config, density = _set_up(args)
    # arguments, router files (RouterFileError is a ValueError), the model (AssetError: it cannot be fetched or read)
    except (ValueError, OSError, AssetError) as error:
        raise SystemExit(f"polar-compile demo: {error}") from None
    return _run(args, model, tokenizer, routers, source, config, density)


def _set_up(args):
    import polar_compile
    from polar_compile.assets import load_smollm2
    from polar_compile.config import CalibrationConfig
    from polar_compile.evaluate import sparse_configs

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_smollm2(dtype=dtype, device=device)
    if args.calibrate:
        density = 2 / 3 if args.density is None else args.density
        config = CalibrationConfig(tokens=args.tokens, density=density)
        routers = polar_compile.calibrate(model, config=config, tokenizer=tokenizer)
        source = f"calibrated now on {args.tokens} tokens"
    else:
        path = Path(args.routers) if args.routers else shipped_routers_path()
        routers = polar_compile.load_routers(path, model)
        source = str(path)
    density = float(routers.density) if args.density is None else args.density
    # a layer index the model lacks fails here, before the dense run's time is spent
    (config,) = sparse_configs(model, routers, [density], args.dense_layers)
    return model, tokenizer, routers, source, config, density


def _run(args, model, tokenizer, routers, source, config, density) -> int:
    import polar_compile

    device, dtype = model.device.type, model.dtype

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)

    dense_ids, dense_step = _generate(model, inputs, args.new_tokens)
    polar_compile.optimize(model, routers, config)
    sparse_ids, sparse_step = _generate(model, inputs, args.new_tokens)

    # Either run may stop early at end-of-sequence: positions past the shorter one count as disagreement.
    common = min(dense_ids.shape[1], sparse_ids.shape[1])
    longest = max(dense_ids.shape[1], sparse_ids.shape[1])
    agree = (dense_ids[:, :common] == sparse_ids[:, :common]).float().sum().item() / (dense_ids.shape[0] * longest)
    layers = ",".join(map(str, config.resolve_dense_layers(routers).dense_layers))
    print(f"SmolLM2-135M on {device} ({dtype}); routers: {source}")
    print(f"attention density {density:.3f}, dense layers {layers}\n")
    for prompt, dense, sparse in zip(prompts, dense_ids, sparse_ids):
        print(f"> {prompt}")
        print(f"  dense : {tokenizer.decode(dense, skip_special_tokens=True)!r}")
        print(f"  polar : {tokenizer.decode(sparse, skip_special_tokens=True)!r}")
    print(f"\ntoken agreement (same token at the same position): {100 * agree:.1f}%")
    batch = len(prompts)
    for name, step in (("dense", dense_step), ("polar", sparse_step)):
        if step:
            note = "" if device == "cuda" else " (CPU, uncompiled graph: correctness demo, not a speed claim)"
            print(f"{name} decode: {batch / step:,.0f} tokens/s ({1e3 * step:.2f} ms/step, batch {batch}){note}")
    print()
    print(polar_compile.explain(model))
    return 0


def add_demo_parser(parser: argparse.ArgumentParser) -> None:
    from polar_compile.evaluate import parse_layers

    parser.add_argument("--routers", help="router file (default: the one shipped for SmolLM2)")
    parser.add_argument("--calibrate", action="store_true", help="calibrate new routers instead")
    parser.add_argument("--tokens", type=int, default=50_000, help="calibration tokens with --calibrate")
    parser.add_argument("--density", type=float, help="attention density (default: the routers')")
    parser.add_argument(
        "--dense-layers",
        type=parse_layers,
        default=None,
        help="comma list of layers kept dense besides layer 0 (default: the router file's calibrated dense layers, "
        "chosen to stay within +5%% perplexity of dense; 0 for layer 0 alone)",
    )
    parser.add_argument("--new-tokens", type=int, default=24,
                        help="tokens generated per prompt (default %(default)s; tokens/s needs >= 2)")  # fmt: skip
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.set_defaults(func=run_demo)
