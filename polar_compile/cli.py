"""The ``polar-compile`` command line: calibrate, bench, eval, demo.

Each subcommand lives in the module that owns its work and registers itself here through
``_SUBCOMMANDS`` (name -> ("module:function" adding its parser, help line)), so this file stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import polar_compile

# name -> (module, function that adds the subparser and sets ``func``), help line
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("polar_compile.routers.cli:add_calibrate_parser", "calibrate routers for a model and save them"),
    "demo": ("polar_compile.demo:add_demo_parser", "SmolLM2-135M dense vs sparse, side by side"),
    "eval": ("polar_compile.evaluate:add_eval_parser", "SmolLM2 accuracy through the compiled decode path"),
    "bench": (
        "polar_compile.bench:add_bench_parser",
        "decode throughput: stock HF vs polar dense vs polar sparse (GPU)",
    ),
}


def _register_available(subparsers: argparse._SubParsersAction) -> None:
    for name, (target, help_line) in _SUBCOMMANDS.items():
        module_name, function_name = target.split(":")
        parser = subparsers.add_parser(name, help=help_line, description=help_line)
        getattr(importlib.import_module(module_name), function_name)(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar-compile",
        description="Polar Sparsity for Hugging Face decoders: calibrate routers, benchmark, evaluate, demo.",
    )
    parser.add_argument("--version", action="version", version=f"polar-compile {polar_compile.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_available(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # no command: the help, and the exit status of a usage error
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
