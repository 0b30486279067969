"""Is the tuned table's (block config, split count) the best one on this GPU for the grids a decode step launches?
One GPU call; prints a table, nothing is adopted by it.

    python benchmarks/probe_attention_splits.py [--shapes llama3-8b:32:4096:8 ...] [--max-splits 8]
        [--splits 1 2 4 8 ...] [--blocks 64/4/3 ...]

The table and its split rule were fitted on an H100. For each shape (model:B:L:k, the key span passed as the
compiled decode step passes it) this times the table's choice, then every block config of the sweep below at split
counts 1..--max-splits, and cuDNN SDPA (enable_gqa) over all groups of the valid keys. TB/s over the bytes read.
The shapes are the attention grids of the decode steps measured below 85% of their byte floor (Llama-3-8B B=16-32,
Qwen2-7B B=64 with 7 query heads per KV head: 64-256 pairs) and two 512-pair controls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa

from polar_compile import bench
from polar_compile.ops import selective_attention as sa

bsa.MODELS.setdefault("qwen2-7b", (28, 4, 128))
bsa.MODELS.setdefault("phi3-mini", (32, 32, 96))  # head_dim 96: the kernel pads d to 128 lanes
SHAPES = ["llama3-8b:16:1024:8", "llama3-8b:16:4096:4", "llama3-8b:16:4096:8", "llama3-8b:32:4096:4",
          "llama3-8b:32:4096:8", "llama3-8b:64:4096:4", "qwen2-7b:64:4096:2", "qwen2-7b:64:4096:4",
          "llama3-8b:1:4096:8", "llama3-8b:64:4096:8", "llama2-7b:32:4096:16"]  # fmt: skip
BLOCKS = [(128, 4, 2), (64, 4, 2), (64, 4, 3), (32, 4, 3), (32, 4, 4)]  # (block_n, warps, stages)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--max-splits", type=int, default=8)
    parser.add_argument("--splits", nargs="+", type=int, help="split counts to sweep (default: 1..--max-splits)")
    parser.add_argument("--rep", type=float, default=20.0)
    parser.add_argument("--blocks", nargs="+", help="block configs to sweep, as block_n/warps/stages")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    blocks = [tuple(int(x) for x in b.split("/")) for b in args.blocks] if args.blocks else BLOCKS
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for ratio, head_dim in sorted({(bsa.MODELS[m][0] // bsa.MODELS[m][1], bsa.MODELS[m][2])
                                   for m in (spec.split(":")[0] for spec in args.shapes)}):  # fmt: skip
        found = []
        for block_n, warps, stages in blocks:
            config = sa.LaunchConfig(block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                found.append(f"{block_n}/{warps}/{stages} {bsa.compiled_occupancy(config, ratio, head_dim)}")
            except Exception as error:  # out of resources
                found.append(f"{block_n}/{warps}/{stages} {type(error).__name__}")
        print(f"programs per SM, R={ratio} d={head_dim}: " + "; ".join(found), flush=True)
    print("shape | pairs | cuDNN all groups | table: config splits ms TB/s | best: config splits ms TB/s | gain")
    for spec in args.shapes:
        model, batch, valid_len, k = bsa.grid_point(spec)
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        ratio = num_heads // num_groups
        inputs = bsa.make_inputs(model, batch, valid_len)
        span = sa.key_span(inputs.mask)
        nbytes = bsa.ours_bytes(inputs, k)
        group_index = bsa.random_groups(batch, num_groups, k)
        table = sa.config_for(ratio, head_dim, device, pairs=batch * k, cache_len=inputs.key_cache.shape[2])
        table_splits = sa.num_splits_for(table, batch * k, inputs.key_cache.shape[2], device)

        def timed(config, group_index=group_index, inputs=inputs, span=span):
            def call():
                return sa.launch_selective_attention(
                    inputs.query, inputs.key_cache, inputs.value_cache, group_index, inputs.mask, inputs.scale, span,
                    config=config,
                )  # fmt: skip

            return bsa.time_ms(call, warmup=5, rep=args.rep), call().float()

        cudnn = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=5, rep=args.rep)
        table_ms, reference = timed(table)
        best = (table_ms, f"{table.block_n}/{table.num_warps}/{table.num_stages}", table_splits)
        sweep = []
        for block_n, warps, stages in blocks:
            for splits in args.splits or range(1, args.max_splits + 1):
                config = sa.LaunchConfig(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)
                try:
                    ms, out = timed(config)
                except Exception as error:  # out of resources
                    sweep.append(f"{block_n}/{warps}/{stages} s{splits}: {type(error).__name__}")
                    continue
                diff = (out - reference).abs().max().item()
                if diff > 5e-2:
                    raise AssertionError(f"{spec} {block_n}/{warps}/{stages} s{splits}: max |diff| {diff}")
                sweep.append(f"{block_n}/{warps}/{stages} s{splits} {ms:.4f}")
                if ms < best[0]:
                    best = (ms, f"{block_n}/{warps}/{stages}", splits)
        print(
            f"{spec} | {batch * k} | cuDNN {cudnn:.4f} ms {bsa.dense_bytes(inputs) / cudnn / 1e9:.2f} | "
            f"table {table.block_n}/{table.num_warps}/{table.num_stages} s{table_splits} {table_ms:.4f} ms "
            f"{nbytes / table_ms / 1e9:.2f} | best {best[1]} s{best[2]} {best[0]:.4f} ms "
            f"{nbytes / best[0] / 1e9:.2f} | "
            f"{table_ms / best[0]:.3f}x",
            flush=True,
        )
        print("    " + "; ".join(sweep), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
