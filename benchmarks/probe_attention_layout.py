"""Probe behind notes/selective_attention.md, session 5 (GPU only): the Llama-3 L=16384 all-groups rows.

    python benchmarks/probe_attention_layout.py

In the full grid those rows ran at 0.83x cuDNN. Here each shape is measured alone in a fresh process, next to
the same cache layout with one query head per group (gqa1-8) and Llama-2's layout with four (gqa4-32), each with
the groups in order and shuffled: if GQA or the group order were the cause, those columns would differ.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa

from polar_compile import bench
from polar_compile.ops import selective_attention as sa

bsa.MODELS["gqa1-8"] = (8, 8, 128)  # Llama-3's cache layout, one query head per group
bsa.MODELS["gqa4-32"] = (128, 32, 128)  # Llama-2's cache layout, four query heads per group
SHAPES = [  # (model, B, L, k)
    ("llama3-8b", 64, 16384, 8),
    ("gqa1-8", 64, 16384, 8),
    ("llama2-7b", 16, 16384, 32),
    ("gqa4-32", 16, 16384, 32),
    ("llama3-8b", 64, 4096, 8),
    ("llama3-8b", 64, 16384, 4),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench.require_cuda(__file__)
    print(torch.cuda.get_device_name(), flush=True)
    for model, batch, valid_len, k in SHAPES:
        inputs = bsa.make_inputs(model, batch, valid_len)
        groups = bsa.MODELS[model][1]
        in_order = torch.arange(groups, device="cuda").expand(batch, groups)[:, :k].contiguous()
        nbytes = bsa.ours_bytes(inputs, k)
        tbps = {}
        for name, index in (("in order", in_order), ("shuffled", bsa.random_groups(batch, groups, k))):

            def ours(index=index, inputs=inputs):
                return sa.launch_selective_attention(
                    inputs.query, inputs.key_cache, inputs.value_cache, index, inputs.mask, inputs.scale
                )

            tbps[name] = nbytes / bsa.time_ms(ours, warmup=3, rep=20) / 1e9
        cudnn = bsa.dense_bytes(inputs) / bsa.time_ms(bsa.cudnn_dense(inputs), warmup=3, rep=20) / 1e9
        print(f"{model:10s} B={batch:3d} L={valid_len} k={k}: ours {tbps['in order']:.2f} TB/s (groups in order), "
              f"{tbps['shuffled']:.2f} (shuffled); cuDNN over all groups {cudnn:.2f}", flush=True)  # fmt: skip
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
