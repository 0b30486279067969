"""A decode step with and without the key span (session 13): the attention pass either passes each step's
``key_span(mask)`` to every layer (as it does) or passes none, so every kernel program scans the mask row.

    python benchmarks/probe_key_span_decode.py llama3-8b 16 1024 polar-1.0,polar-paper scan,span

Lean loop, 32 new tokens, one ``bench.run`` per variant (each system compiles afresh).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import polar_compile.ops.selective_attention as sa
from polar_compile import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("context", type=int)
    parser.add_argument("systems", nargs="?", default="polar-1.0,polar-paper", help="comma-separated")
    parser.add_argument("variants", nargs="?", default="span,scan", help="comma-separated: span, scan")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    model, batch, context = args.model, args.batch, args.context
    systems, variants = args.systems.split(","), args.variants.split(",")
    bandwidth = bench.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    real = sa.key_span
    try:
        for variant in variants:
            # the pass looks key_span up when it runs: a stand-in returning None leaves every layer scanning
            sa.key_span = real if variant == "span" else (lambda mask: None)
            for r in bench.run(
                [model], [batch], [context], systems, new_tokens=32, bandwidth=bandwidth, loops=("lean",)
            ):
                print(
                    f"AB {variant:5s} {model} B={batch} ctx={context} {r.system:12s} {r.loop:6s} {r.ms_per_step:.3f}"
                    f" ms/step floor {r.fraction_of_floor:.3f} skips {r.cudagraph_skips} layers {r.layers_rewritten}",
                    flush=True,
                )
    finally:
        sa.key_span = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
