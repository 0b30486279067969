"""Does a split kernel that fits more programs per SM read faster? Block shapes x split counts on decode shapes.

    python benchmarks/probe_attention_occupancy.py [--shapes llama2-7b:32:4096:16 ...]

For each shape (model:B:L:k) time `polar::selective_attention`'s kernels (HF's masked variant, as the compiled
model calls them) for every (block_n, warps, stages) in BLOCKS and every split count, next to cuDNN SDPA (enable_gqa)
over the same valid keys; print TB/s over the bytes read and each compiled variant's registers, shared memory and
resident programs per SM. The question (notes/decode_step.md): Llama-2's half-heads grid (512 pairs) runs 2 splits
in 2.6 waves of 396 slots and reads ~3% slower per byte than the dense grid; a config with 4+ programs per SM would
hold all 512 pairs at once with one split and no merge launch.
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
from polar_compile.ops._library import resident_programs

BLOCKS = [(128, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (64, 8, 3), (128, 8, 2)]
SPLITS = (1, 2, 3, 4)
SHAPES = ["llama2-7b:32:4096:16", "llama2-7b:32:4096:32", "llama2-7b:16:4096:16", "llama2-7b:16:4096:32",
          "llama3-8b:64:4096:4", "llama3-8b:64:4096:8"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--rep", type=float, default=15.0)
    args = parser.parse_args()
    bench.require_cuda(__file__)
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for spec in args.shapes:
        model, batch, valid_len, k = bsa.grid_point(spec)
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        inputs = bsa.make_inputs(model, batch, valid_len)
        nbytes = bsa.ours_bytes(inputs, k)
        cudnn = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=3, rep=args.rep)
        cudnn_tbps = bsa.dense_bytes(inputs) / cudnn / 1e9
        group_index = bsa.random_groups(batch, num_groups, k)
        base = sa.config_for(num_heads // num_groups, head_dim, device, pairs=batch * k)
        rule = sa.num_splits_for(base, batch * k, inputs.key_cache.shape[2], device)
        print(f"\n{model} B={batch} L={valid_len} k={k}: cuDNN (all groups) {cudnn:.4f} ms {cudnn_tbps:.2f} TB/s; "
              f"table {base.block_n}/{base.num_warps}/{base.num_stages} rule splits {rule}", flush=True)  # fmt: skip
        best = None
        for block_n, warps, stages in BLOCKS:
            cells = []
            for splits in SPLITS:
                config = sa.LaunchConfig(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)

                def call(config=config, inputs=inputs, group_index=group_index):
                    return sa.launch_selective_attention(
                        inputs.query, inputs.key_cache, inputs.value_cache, group_index, inputs.mask, inputs.scale,
                        config=config,
                    )  # fmt: skip

                try:
                    ms = bsa.time_ms(call, warmup=3, rep=args.rep)
                except Exception as error:  # out of resources
                    cells.append(f"s{splits}: {type(error).__name__}")
                    continue
                tbps = nbytes / ms / 1e9
                cells.append(f"s{splits} {ms:.4f} ms {tbps:.2f}")
                if best is None or ms < best[0]:
                    best = (ms, block_n, warps, stages, splits)
            occ = [r for r in resident_programs(sa._split_kernel, device)
                   if r["constants"].get("BLOCK_N") == block_n and r["warps"] == warps and r["stages"] == stages
                   and r["constants"].get("HAS_MASK") == 1]  # fmt: skip
            occ_text = ",".join(f"{r['occupancy']}/SM ({r['regs']} regs, {r['shared'] // 1024} KB)" for r in occ[:2])
            print(f"  n={block_n:<3d} w={warps} st={stages}: " + " | ".join(cells) + f"  [{occ_text}]", flush=True)
        ms, block_n, warps, stages, splits = best
        tbps = nbytes / ms / 1e9
        print(f"  best: n={block_n} w={warps} st={stages} s{splits} {ms:.4f} ms {tbps:.2f} TB/s", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
