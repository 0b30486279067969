"""``polar-compile calibrate MODEL --out routers.safetensors``: calibrate routers, save them, print recall per layer."""

from __future__ import annotations

import argparse
import os
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


def _print_selection(meta: dict) -> None:
    selection = meta.get("layer_selection")
    if not selection:
        print("\nno dense-layer selection: optimize keeps layer 0 alone dense")
        return
    change, budget = selection["change_percent"], selection["budget_percent"]
    print(f"\ndense layers {','.join(map(str, meta['dense_layers']))}: perplexity {change[0]:+.2f}% "
          f"[{change[1]:+.2f}, {change[2]:+.2f}] against dense (budget: upper bound <= +{budget:g}%;"
          f" {selection['windows']} held-out windows, {selection['tokens']} tokens, k = {selection['k']})")  # fmt: skip
    if selection.get("ranking", "single") == "single":
        ranked = sorted(selection["sensitivity_percent"].items(), key=lambda item: -item[1][0])
        print("only one layer sparse, most sensitive first: " + ", ".join(f"{i} {c[0]:+.2f}%" for i, c in ranked))
    else:
        ranked = sorted(selection["sensitivity_percent"].items(), key=lambda item: item[1][0])
        print("all sparse but one, most sensitive first: " + ", ".join(f"{i} {c[0]:+.2f}%" for i, c in ranked))
    print("n most sensitive dense: " + ", ".join(f"{n} {c[0]:+.2f}% (<= {c[2]:+.2f})"
                                                   for n, c in selection["curve_percent"].items()))  # fmt: skip


def _check_before_loading(args) -> None:
    """What is wrong with the arguments, found before the model loads and calibration runs for minutes."""
    from polar_compile.config import CalibrationConfig

    if args.from_routers and args.no_layer_selection:
        raise ValueError("--from-routers runs only the selection; drop --no-layer-selection")
    for flag, path in (("--text-file", args.text_file), ("--selection-text-file", args.selection_text_file),
                       ("--from-routers", args.from_routers)):  # fmt: skip
        if path and not Path(path).is_file():
            raise ValueError(f"{flag}: no file at {path}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder: name the .safetensors file to write")
    local = args.model.startswith(("/", "./", "../", "~")) or Path(args.model).exists()
    if args.model != "smollm2" and local and not Path(args.model).expanduser().is_dir():
        raise ValueError(f"no model folder at {args.model}")
    CalibrationConfig(tokens=args.tokens, density=0.5 if args.density is None else args.density, epochs=args.epochs,
                      learning_rate=args.lr, perplexity_budget=args.perplexity_budget)  # fmt: skip


def run_calibrate(args) -> int:
    """The subcommand; a bad argument, model, text or router file ends it with one line naming the problem."""
    try:
        return _run_calibrate(args)
    except (ValueError, OSError) as error:  # config checks, unsupported models, router files, missing paths
        raise SystemExit(f"polar-compile calibrate: {error}") from None


def _run_calibrate(args) -> int:
    from polar_compile.config import CalibrationConfig
    from polar_compile.model_info import describe_model
    from polar_compile.routers.calibrate import add_layer_selection, calibrate
    from polar_compile.routers.io import load_routers, save_routers

    _check_before_loading(args)
    model, tokenizer = _load_model(os.path.expanduser(args.model), args.mha)
    info = describe_model(model)
    budget = None if args.no_layer_selection else args.perplexity_budget
    selection_texts = _read_texts(args.selection_text_file) if args.selection_text_file else None
    if args.from_routers:  # keep these routers: only (re)run the dense-layer selection
        routers = load_routers(args.from_routers, model)
        if selection_texts is None:
            from polar_compile.assets import load_wiki_texts

            selection_texts = load_wiki_texts("validation")
        config = CalibrationConfig(perplexity_budget=budget, layer_ranking=args.ranking)
        start = time.perf_counter()
        add_layer_selection(model, routers, selection_texts, config, tokenizer=tokenizer, progress=not args.quiet)
        save_routers(routers, args.out)
        _print_selection(routers.metadata)
        print(f"\nselection {time.perf_counter() - start:.0f} s; wrote {args.out} (the routers of {args.from_routers})")
        return 0
    density = args.density if args.density is not None else default_density(info.num_heads, info.num_groups)
    config = CalibrationConfig(
        tokens=args.tokens,
        density=density,
        mlp={True: "on", False: "off", None: "auto"}[args.mlp],
        epochs=args.epochs,
        learning_rate=args.lr,
        seed=args.seed,
        label=args.label,
        perplexity_budget=budget,
        layer_ranking=args.ranking,
    )
    texts = _read_texts(args.text_file) if args.text_file else None
    start = time.perf_counter()
    routers = calibrate(
        model, texts, config, tokenizer=tokenizer, selection_texts=selection_texts, progress=not args.quiet
    )
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
    _print_selection(meta)
    select = f", select {meta['seconds']['select']:.0f} s" if "select" in meta["seconds"] else ""
    print(
        f"\n{meta['calibration_tokens']} tokens; collect {meta['seconds']['collect']:.0f} s, "
        f"train {meta['seconds']['train']:.0f} s{select}, total {seconds:.0f} s; wrote {args.out} "
        f"({Path(args.out).stat().st_size / 1024:.0f} KiB)"
    )
    return 0


def add_calibrate_parser(parser: argparse.ArgumentParser) -> None:
    from polar_compile.config import LAYER_RANKINGS, CalibrationConfig

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
    parser.add_argument("--perplexity-budget", type=float, default=defaults.perplexity_budget,
                        help="after training, keep dense the fewest of the most sensitive layers for which the "
                        "perplexity change's 95%% upper bound on held-out text is within this many percent "
                        f"(default {defaults.perplexity_budget:g}); optimize keeps them dense")  # fmt: skip
    parser.add_argument("--ranking", choices=LAYER_RANKINGS, default=defaults.layer_ranking,
                        help="how the selection ranks layers: by the change with only that layer sparse, or by the "
                        "gain from keeping only that layer dense (default %(default)s)")  # fmt: skip
    parser.add_argument("--no-layer-selection", action="store_true",
                        help="skip that selection (optimize then keeps layer 0 alone dense)")  # fmt: skip
    parser.add_argument("--selection-text-file", help="held-out text for the selection (documents separated by "
                        "blank lines); default: the shipped Wikipedia validation split, when calibrating on the "
                        "shipped text (with --text-file and no selection text the selection is skipped)")  # fmt: skip
    parser.add_argument("--from-routers", metavar="FILE", help="keep the routers of FILE (no training): only run the "
                        "dense-layer selection for them and write the result to --out")  # fmt: skip
    parser.add_argument("--mha", action="store_true", help="expand KV heads first: each query head its own group")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_calibrate)
