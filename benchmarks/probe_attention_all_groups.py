"""Does the way every group is selected, or the key span, change the time of a density-1.0 launch? One GPU call; prints
a table, nothing is adopted by it.

    python benchmarks/probe_attention_all_groups.py [--shapes llama3-8b:128:16384:8 ...] [--blocks 32/4/3 64/4/3 ...]

The benchmark's density-1.0 rows pass no group index (``group_index=None``, as a dense layer of the decode step does),
with the key span the compiled decode step passes. Session 42 saw that launch at Llama-3 B=128 L=16384 (1,024 pairs) run
~4% slower than the same launch without the span (every program scans its mask row) and ~3% slower than the probe of
benchmarks/probe_attention_splits.py, which gives every group as an index. For each shape and block config (the table's,
then --blocks, unsplit unless the table splits) this times: no index, an ascending index, a per-sequence permutation;
each with and without the span; two interleaved rounds, the faster kept; and cuDNN SDPA over the valid keys. Outputs are
checked against the table's launch.
Session 43 (results/probe_attention_all_groups_h100_s43.log): no index with the span 2.804 ms, an ascending index
2.700, cuDNN 2.694. The cause was the binary, not the order: with the every-group branch a constexpr, that launch
compiled to 96 registers instead of 114 (five programs a SM, not the table's four). It is a runtime value since, and
all six variants should now time alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa

from polar_compile import bench
from polar_compile.ops import selective_attention as sa

SHAPES = ["llama3-8b:128:16384:8", "llama3-8b:128:4096:8", "llama2-7b:16:1024:32", "llama3-8b:64:1024:8"]


def density_one_point(spec: str) -> tuple[str, int, int, int, int, int]:
    """(model, B, L, Hq, Hkv, head_dim) of a "model:B:L:k" grid point whose k selects every group."""
    model, batch, valid_len, k = bsa.grid_point(spec)
    num_heads, num_groups, head_dim = bsa.MODELS[model]
    if k != num_groups:
        raise SystemExit(f"{spec}: k must be every group ({num_groups}) for a density-1.0 launch")
    return model, batch, valid_len, num_heads, num_groups, head_dim


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="model:B:L:k with k = every group")
    parser.add_argument("--blocks", nargs="*", default=[], help="more block configs, as block_n/warps/stages")
    parser.add_argument("--rep", type=float, default=30.0)
    args = parser.parse_args()
    points = {spec: density_one_point(spec) for spec in args.shapes}  # a bad shape stops before any GPU work
    bench.require_cuda(__file__)
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for spec, (model, batch, valid_len, num_heads, num_groups, head_dim) in points.items():
        k = num_groups
        inputs = bsa.make_inputs(model, batch, valid_len)
        cache_len = inputs.key_cache.shape[2]
        span = sa.key_span(inputs.mask)
        table = sa.config_for(num_heads // num_groups, head_dim, device, pairs=batch * k, cache_len=cache_len)
        configs = {f"table {table.block_n}/{table.num_warps}/{table.num_stages}": table}
        for block in args.blocks:
            block_n, warps, stages = (int(x) for x in block.split("/"))
            configs[block] = dataclasses.replace(table, block_n=block_n, num_warps=warps, num_stages=stages)
        indices = {
            "none": None,
            "ascending": torch.arange(num_groups, device=device, dtype=torch.int32).expand(batch, -1).contiguous(),
            "permuted": bsa.random_groups(batch, num_groups, k).to(torch.int32),
        }
        cudnn = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=5, rep=args.rep)

        def launcher(config, group_index, key_span, x=inputs):
            return lambda: sa.launch_selective_attention(
                x.query, x.key_cache, x.value_cache, group_index, x.mask, x.scale, key_span, config=config
            )

        reference = launcher(table, None, span)().float()
        calls = {}
        for config_name, config in configs.items():
            for index_name, group_index in indices.items():
                for span_name, key_span in (("span", span), ("scan", None)):
                    call = launcher(config, group_index, key_span)
                    diff = (call().float() - reference).abs().max().item()
                    if diff > 5e-2:
                        raise AssertionError(f"{spec} {config_name} {index_name} {span_name}: max |diff| {diff}")
                    calls[(config_name, index_name, span_name)] = call
        best = {key: float("inf") for key in calls}
        for _ in range(2):  # interleaved rounds: a slow spell of the machine hits every variant alike
            for key, call in calls.items():
                best[key] = min(best[key], bsa.time_ms(call, warmup=5, rep=args.rep))
        splits = sa.num_splits_for(table, batch * k, cache_len, device)
        print(f"{spec} | {batch * k} pairs, table splits {splits} | cuDNN {cudnn:.4f} ms", flush=True)
        for (config_name, index_name, span_name), ms in best.items():
            line = f"    {config_name:>14} {index_name:>9} {span_name}: {ms:.4f} ms ({cudnn / ms:.3f}x cuDNN)"
            print(line, flush=True)
        del inputs, calls
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
