"""Does the balanced grid (LaunchConfig.stream) read faster than the tuned split grid where the grid is small or not
a whole number of waves? One GPU call; prints a table, nothing is adopted by it.

    python benchmarks/probe_attention_stream.py [--shapes llama3-8b:16:4096:4 ...] [--occupancy 2 3 4]

For each shape (model:B:L:k) it times, on the same tensors with the key span passed as the compiled decode step
passes it: the table's config (split rule, merge launch when split), the balanced grid at the table's occupancy and
at each --occupancy, and cuDNN SDPA (enable_gqa) over all groups of the valid keys. TB/s over the bytes read. Each
balanced variant is also checked against the table's output (max abs difference; bf16, so ~1e-2 is rounding).
The shapes are the issue-3 misses (Llama-3 B=16 and B=1, <= 128 pairs), the decode steps whose sparse share of
the floor was lowest in session 15 (Llama-3 B=32 at 4 of 8 groups; Llama-2 B=32 at half the heads: 512 pairs on a
528-slot wide grid) and two dense grids as controls.
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

from polar_compile.ops import selective_attention as sa

SHAPES = ["llama3-8b:16:4096:4", "llama3-8b:16:4096:5", "llama3-8b:16:4096:2", "llama3-8b:16:4096:8",
          "llama3-8b:1:16384:8", "llama3-8b:1:4096:8", "llama3-8b:32:4096:4", "llama2-7b:32:4096:16",
          "llama2-7b:1:16384:32", "llama3-8b:64:4096:8", "llama2-7b:32:4096:32"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--occupancy", nargs="*", type=int, default=[], help="balanced grids of these programs/SM too")
    parser.add_argument("--rep", type=float, default=20.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    print("shape | pairs | cuDNN all groups | table (splits) | balanced, occupancy: ms TB/s max|diff|", flush=True)
    for spec in args.shapes:
        model, batch, valid_len, k = spec.split(":")
        batch, valid_len, k = int(batch), int(valid_len), int(k)
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        inputs = bsa.make_inputs(model, batch, valid_len)
        span = sa.key_span(inputs.mask)
        nbytes = bsa.ours_bytes(inputs, k)
        group_index = bsa.random_groups(batch, num_groups, k)
        table = sa.config_for(num_heads // num_groups, head_dim, device, pairs=batch * k)
        splits = sa.num_splits_for(table, batch * k, inputs.key_cache.shape[2], device)

        def call(config, group_index=group_index, inputs=inputs, span=span):
            return sa.launch_selective_attention(
                inputs.query, inputs.key_cache, inputs.value_cache, group_index, inputs.mask, inputs.scale, span,
                config=config,
            )  # fmt: skip

        cudnn = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=5, rep=args.rep)
        reference = call(table).float()
        ms = bsa.time_ms(lambda table=table: call(table), warmup=5, rep=args.rep)
        cells = [f"cuDNN {cudnn:.4f} ms {bsa.dense_bytes(inputs) / cudnn / 1e9:.2f}",
                 f"table {ms:.4f} ms {nbytes / ms / 1e9:.2f} (s{splits})"]  # fmt: skip
        for occupancy in dict.fromkeys([table.occupancy, *args.occupancy]):
            config = dataclasses.replace(table, stream=True, occupancy=occupancy)
            try:
                diff = (call(config).float() - reference).abs().max().item()
                ms = bsa.time_ms(lambda config=config: call(config), warmup=5, rep=args.rep)
            except Exception as error:  # out of resources
                cells.append(f"o{occupancy}: {type(error).__name__}")
                continue
            cells.append(f"o{occupancy} {ms:.4f} ms {nbytes / ms / 1e9:.2f} {diff:.1e}")
        print(f"{spec} | {batch * k} | " + " | ".join(cells), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
