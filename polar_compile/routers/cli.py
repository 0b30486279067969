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


# Flags that shape training, with their defaults None so that a given one can be told from an absent one.
_TRAINING_FLAGS = {"tokens": "--tokens", "density": "--density", "mlp": "--mlp", "mlp_rank": "--mlp-rank",
                   "epochs": "--epochs", "lr": "--lr", "seed": "--seed", "label": "--label",
                   "text_file": "--text-file", "sequence_length": "--sequence-length"}  # fmt: skip
_SELECTION_FLAGS = {"selection_text_file": "--selection-text-file", "perplexity_budget": "--perplexity-budget",
                    "ranking": "--ranking"}  # fmt: skip


def _given(args, flags: dict[str, str]) -> list[str]:
    return [flag for name, flag in flags.items() if getattr(args, name) is not None]


def _check_out(out: str) -> None:
    """--out names a file to write: not a folder, under a folder that exists (or can be made) and is writable."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder: name the .safetensors file to write")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: the folder {parent} is not writable")


def _check_before_loading(args) -> None:
    """What is wrong with the arguments, found before the model loads and calibration runs for minutes."""
    if args.from_routers and args.no_layer_selection:
        raise ValueError("--from-routers runs only the selection; drop --no-layer-selection")
    training, selection = _given(args, _TRAINING_FLAGS), _given(args, _SELECTION_FLAGS)
    if args.from_routers and training:
        raise ValueError(f"--from-routers keeps the file's routers (no training), so {', '.join(training)} would do "
                         "nothing: drop them (held-out text for the selection: --selection-text-file)")  # fmt: skip
    if args.no_layer_selection and selection:
        raise ValueError(f"--no-layer-selection skips the selection, so {', '.join(selection)} would do nothing: "
                         "drop one or the other")  # fmt: skip
    tuning = [flag for flag in selection if flag != "--selection-text-file"]
    if args.text_file and not args.selection_text_file and tuning:
        raise ValueError(f"with --text-file and no --selection-text-file the dense-layer selection is skipped, so "
                         f"{', '.join(tuning)} would do nothing: give held-out text (--selection-text-file) or drop "
                         f"{'it' if len(tuning) == 1 else 'them'}")  # fmt: skip
    for flag, path in (("--text-file", args.text_file), ("--selection-text-file", args.selection_text_file),
                       ("--from-routers", args.from_routers)):  # fmt: skip
        if path and not Path(path).is_file():
            what = "not a regular file" if Path(path).exists() else "no file"
            raise ValueError(f"{flag}: {what} at {path}")
    _check_out(args.out)
    local = args.model.startswith(("/", "./", "../", "~")) or Path(args.model).exists()
    if args.model != "smollm2" and local and not Path(args.model).expanduser().is_dir():
        raise ValueError(f"no model folder at {args.model}")
    config = _config(args, density=0.5 if args.density is None else args.density)
    check_token_budget(config)


def _config(args, density: float):
    """The CalibrationConfig of the arguments (defaults for the flags not given)."""
    from polar_compile.config import CalibrationConfig

    defaults = CalibrationConfig()
    given = {
        field: value
        for field, value in (
            ("tokens", args.tokens), ("mlp_rank", args.mlp_rank), ("epochs", args.epochs),
            ("learning_rate", args.lr), ("seed", args.seed), ("label", args.label), ("layer_ranking", args.ranking),
            ("sequence_length", args.sequence_length),
        )
        if value is not None
    }  # fmt: skip
    budget = args.perplexity_budget if args.perplexity_budget is not None else defaults.perplexity_budget
    return CalibrationConfig(
        density=density,
        mlp={True: "on", False: "off", None: "auto"}[args.mlp],
        perplexity_budget=None if args.no_layer_selection else budget,
        **given,
    )


def run_calibrate(args) -> int:
    """The subcommand; a bad argument, model, text or router file ends it with one line naming the problem."""
    try:
        return _run_calibrate(args)
    except (ValueError, OSError) as error:  # config checks, unsupported models, router files, missing paths
        raise SystemExit(f"polar-compile calibrate: {error}") from None


def _run_calibrate(args) -> int:
    from polar_compile.model_info import describe_model
    from polar_compile.routers.calibrate import add_layer_selection, calibrate
    from polar_compile.routers.io import load_routers, save_routers
    from polar_compile.routers.select import selection_windows

    _check_before_loading(args)
    texts = _read_texts(args.text_file) if args.text_file else None
    if texts == []:
        raise ValueError(f"--text-file {args.text_file} holds no text")
    model, tokenizer = _load_model(os.path.expanduser(args.model), args.mha)
    info = describe_model(model)
    density = args.density if args.density is not None else default_density(info.num_heads, info.num_groups)
    config = _config(args, density)
    selection_texts = None
    if args.selection_text_file and config.perplexity_budget is not None:  # cut now: a problem shows before training
        try:
            selection_texts = selection_windows(_read_texts(args.selection_text_file), tokenizer,
                                                limit=config.selection_windows)  # fmt: skip
        except ValueError as error:
            raise ValueError(f"--selection-text-file {args.selection_text_file}: {error}") from None
    if args.from_routers:  # keep these routers: only (re)run the dense-layer selection
        routers = load_routers(args.from_routers, model)
        if selection_texts is None:
            from polar_compile.assets import load_wiki_texts

            selection_texts = load_wiki_texts("validation")
        start = time.perf_counter()
        add_layer_selection(model, routers, selection_texts, config, tokenizer=tokenizer, progress=not args.quiet)
        # Write the file's own (float32) tensors with the new metadata: the copy the selection ran on was cast to
        # the model's dtype, and saving it would round the routers to bf16/fp16 for good.
        original = load_routers(args.from_routers)
        original.metadata = routers.metadata
        save_routers(original, args.out)
        _print_selection(routers.metadata)
        print(f"\nselection {time.perf_counter() - start:.0f} s; wrote {args.out} (the routers of {args.from_routers})")
        return 0
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
    if meta["mlp_layers"] and not info.relu_mlp:
        print(f"\nthe MLP routers are for a {info.activation} MLP: optimize uses them with "
              "SparsityConfig(mlp='on') only ('auto' keeps non-ReLU MLPs dense)")  # fmt: skip
    elif meta["mlp_layers"]:
        print("\noptimize uses the MLP routers with SparsityConfig(mlp='auto') or 'on' (the default 'off' keeps "
              "every MLP dense: measured faster at batch >= 16)")  # fmt: skip
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
    parser.add_argument("--tokens", type=int, help=f"calibration tokens (default {defaults.tokens})")
    parser.add_argument(
        "--density", type=float, help="attention density (default: 0.5 for MHA; GQA: just over half the groups)"
    )
    parser.add_argument(
        "--mlp", action=argparse.BooleanOptionalAction, default=None, help="MLP routers (default: ReLU MLPs only)"
    )
    parser.add_argument("--mlp-rank", type=int, help="rank of the MLP routers d -> r -> F (default: 1024, or d / 4 "
                        "for a model narrower than 4096)")  # fmt: skip
    parser.add_argument("--text-file", help="calibrate on this text (documents separated by blank lines); "
                        "default: the shipped Wikipedia train split")  # fmt: skip
    parser.add_argument("--sequence-length", type=int, help="tokens a calibration sequence (default "
                        f"{defaults.sequence_length}; at most the model's max_position_embeddings)")  # fmt: skip
    parser.add_argument("--epochs", type=int, help=f"epochs per router (default {defaults.epochs})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate (default {defaults.learning_rate})")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--label", choices=("pre", "post"),
                        help="group score for the attention label: the group's contribution norm after o_proj "
                        "(post, the default) or the head output norm before o_proj (pre, the paper's)")  # fmt: skip
    parser.add_argument("--perplexity-budget", type=float,
                        help="after training, keep dense the fewest of the most sensitive layers for which the "
                        "perplexity change's 95%% upper bound on held-out text is within this many percent "
                        f"(default {defaults.perplexity_budget:g}); optimize keeps them dense")  # fmt: skip
    parser.add_argument("--ranking", choices=LAYER_RANKINGS,
                        help="how the selection ranks layers: by the change with only that layer sparse, or by the "
                        f"gain from keeping only that layer dense (default {defaults.layer_ranking})")  # fmt: skip
    parser.add_argument("--no-layer-selection", action="store_true",
                        help="skip that selection (optimize then keeps layer 0 alone dense)")  # fmt: skip
    parser.add_argument("--selection-text-file", help="held-out text for the selection (documents of at least 128 "
                        "tokens, separated by blank lines); default: the shipped Wikipedia validation split, when "
                        "calibrating on the shipped text (with --text-file and no selection text the selection is "
                        "skipped)")  # fmt: skip
    parser.add_argument("--from-routers", metavar="FILE", help="keep the routers of FILE (no training): only run the "
                        "dense-layer selection for them and write the result to --out")  # fmt: skip
    parser.add_argument("--mha", action="store_true", help="expand KV heads first: each query head its own group")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_calibrate)


def check_token_budget(config) -> None:
    """--tokens must cover two sequences (one is held out to measure recall): said before the model loads."""
    if config.tokens <= config.sequence_length:
        raise ValueError(f"--tokens must be more than one sequence of {config.sequence_length} tokens (one sequence "
                         f"is held out to measure recall), got {config.tokens}")  # fmt: skip
