"""When each program of the attention split kernel starts, starts streaming K/V, and ends (H100, session 13).

    python benchmarks/probe_attention_timeline.py > benchmarks/results/probe_attention_timeline_<gpu>.log

Loads an instrumented copy of ``polar_compile/ops/selective_attention.py`` (from a temporary directory; it reads the
real launch table): the split kernel stores ``%globaltimer`` at its start, before its key loop and at its end, and
``%smid``. For each shape: the op timed as in bench_selective_attention (CUDA graph, clean L2) with the key span and
with the mask scan, then one instrumented launch of each, summarised (pre-loop time, program times, end spread).
"""

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_selective_attention as b

from polar_compile import bench

SOURCE = Path(__file__).resolve().parents[1] / "polar_compile/ops/selective_attention.py"
CASES = [  # (model, B, L, k)
    ("llama3-8b", 16, 4096, 8), ("llama3-8b", 16, 4096, 4), ("llama3-8b", 16, 4096, 2), ("llama3-8b", 16, 1024, 8),
    ("llama3-8b", 1, 16384, 8), ("llama3-8b", 1, 4096, 8), ("llama2-7b", 16, 4096, 32), ("llama2-7b", 32, 4096, 16),
    ("llama2-7b", 64, 4096, 16),
]  # fmt: skip


def instrumented_module():
    src = SOURCE.read_text().split("# The registered op")[0]  # no op registration: the real module owns it

    def replace(old, new):
        nonlocal src
        assert src.count(old) == 1, f"the kernel source changed: {old[:60]!r} not found once"
        src = src.replace(old, new)

    replace("    span_ptr,  #", "    t_ptr,\n    span_ptr,  #")
    replace("    pair = tl.program_id(0)\n", "    t0 = _gtimer()\n    pair = tl.program_id(0)\n")
    loop = "    length = tl.maximum(end - start, 0)\n"
    replace(loop, loop + "    t1 = _gtimer()\n")
    replace(
        "@_jit(do_not_specialize=_RUNTIME_INTS)\ndef _split_kernel(",
        "@triton.jit\ndef _gtimer():\n"
        '    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, '
        "pack=1)\n\n\n@triton.jit\ndef _smid():\n"
        '    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)\n'
        "\n\nTIMING = {}\n\n\n@_jit(do_not_specialize=_RUNTIME_INTS)\ndef _split_kernel(",
    )
    replace(
        "\n\n@_jit(do_not_specialize=(",
        "\n    pid = (pair * num_splits + split).to(tl.int64) * 4\n    tl.store(t_ptr + pid, t0)\n"
        "    tl.store(t_ptr + pid + 1, t1)\n    tl.store(t_ptr + pid + 2, _gtimer())\n"
        "    tl.store(t_ptr + pid + 3, _smid().to(tl.int64))\n\n\n@_jit(do_not_specialize=(",
    )
    replace("        mask,\n        span,\n", "        mask,\n        TIMING['buffer'],\n        span,\n")
    path = Path(tempfile.mkdtemp()) / "selective_attention_timeline.py"  # triton reads the kernels' source from it
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("selective_attention_timeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    module._CONFIG_FILE = SOURCE.with_name("selective_attention_configs.json")  # the tuned table, not the default
    return module


def launcher(probe, inputs, groups, key_span):
    def call():
        return probe.launch_selective_attention(
            inputs.query, inputs.key_cache, inputs.value_cache, groups, inputs.mask, inputs.scale, key_span
        )

    return call


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench.require_cuda(__file__)
    probe = instrumented_module()
    device = torch.device("cuda")
    flush = torch.empty(2**26, dtype=torch.int32, device=device)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for model, batch, valid_len, k in CASES:
        inputs = b.make_inputs(model, batch, valid_len)
        num_heads, num_groups, head_dim = b.MODELS[model]
        groups = b.random_groups(batch, num_groups, k)
        pairs = batch * k
        config = probe.config_for(num_heads // num_groups, head_dim, device, pairs=pairs)
        splits = probe.num_splits_for(config, pairs, inputs.key_cache.shape[2], device)
        probe.TIMING["buffer"] = torch.zeros(pairs * splits * 4, dtype=torch.int64, device=device)
        span = probe.key_span(inputs.mask)
        nbytes = b.ours_bytes(inputs, k)
        calls = {"span": launcher(probe, inputs, groups, span), "scan": launcher(probe, inputs, groups, None)}
        line = f"\n{model} B={batch} L={valid_len} k={k}: {pairs} pairs, {splits} splits, block_n {config.block_n};"
        for name, call in calls.items():
            ms = bench.time_kernel(bench.graphed(call))
            line += f" {name} {ms * 1e3:.1f} us ({nbytes / ms / 1e9:.2f} TB/s)"
        print(line, flush=True)
        for name, call in calls.items():
            call()
            flush.sum()
            probe.TIMING["buffer"].zero_()
            call()
            torch.cuda.synchronize()
            stamps = probe.TIMING["buffer"].view(-1, 4).cpu().double()
            start, loop, end = (((stamps[:, i] - stamps[:, 0].min()) / 1e3).tolist() for i in range(3))
            pre = [b_ - a for a, b_ in zip(start, loop)]
            took = [c - a for a, c in zip(start, end)]
            ends = sorted(end)
            print(
                f"  [{name}] kernel {ends[-1]:.1f} us; pre-loop median {statistics.median(pre):.2f} max {max(pre):.2f};"
                f" program min {min(took):.1f} median {statistics.median(took):.1f} max {max(took):.1f};"
                f" ends first {ends[0]:.1f} median {statistics.median(ends):.1f} last {ends[-1]:.1f};"
                f" SMs used {len(set(stamps[:, 3].long().tolist()))}",
                flush=True,
            )
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
