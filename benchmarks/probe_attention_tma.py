"""Where is the split kernel's last 3-6% against cuDNN on the decode grids?  One GPU call; nothing is adopted by it.

    python benchmarks/probe_attention_tma.py [--shapes llama2-7b:32:4096:16 ...] [--check]

For each shape (model:B:L:k, the key span passed as the compiled decode step passes it) this times, on the same
tensors, in alternating rounds:
- table: the op as the compiled step launches it (mask + span, the table's config and split count);
- nomask: the same kernel and config without the mask (HAS_MASK=0: no per-block mask load, K/V loads predicated on
  the span's tail only) -- what a hole-free span would allow;
- tma <block_n>/<warps>/<stages>: a probe copy of the key loop whose K and V tiles come through Hopper's tensor
  memory accelerator (host-side triton TensorDescriptor over the cache viewed as (B*Hkv*S_max, D)), span only,
  the table's split count (and the op's merge kernel for splits > 1);
- cuDNN SDPA (enable_gqa) over all groups of the valid keys.
TB/s over the bytes each reads. --check runs the tma kernel against the op on small CPU shapes under
TRITON_INTERPRET=1 (no GPU needed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_compile import bench
from polar_compile.ops import selective_attention as sa
from polar_compile.ops._library import dot_acc, tl, triton

SHAPES = ["llama2-7b:32:4096:16", "llama2-7b:32:4096:32", "llama3-8b:64:4096:8", "llama3-8b:32:4096:4",
          "llama3-8b:16:4096:8", "llama3-8b:64:4096:4", "llama3-8b:16:4096:4"]  # fmt: skip
TMA_BLOCKS = [(32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (64, 8, 4)]


@triton.jit
def _tma_kernel(
    q_ptr, k_desc, v_desc, group_ptr, span_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    qk_scale, num_selected, num_groups, ratio, seq_len, head_dim, num_splits,
    stride_qb, stride_qh, stride_gb, stride_gk, stride_pb, stride_pk, stride_ob, stride_oh,
    DIRECT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    split = tl.program_id(1)
    qk_scale = tl.cast(qk_scale, tl.float32)
    batch = pair // num_selected
    slot = pair % num_selected
    group = tl.load(group_ptr + batch * stride_gb + slot * stride_gk).to(tl.int32)
    batch64 = batch.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = group * ratio + offs_r
    mask_r = offs_r < ratio
    q = tl.load(q_ptr + batch64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_r[:, None])
    span_row = span_ptr + batch64 * stride_pb
    first = tl.minimum(tl.maximum(tl.load(span_row), 0), seq_len).to(tl.int32)
    last = tl.minimum(tl.maximum(tl.load(span_row + stride_pk), 0), seq_len).to(tl.int32)
    span = tl.maximum(last - first, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, last)
    base = (batch * num_groups + group) * seq_len  # row of (batch, group, key 0) in the (B*Hkv*S_max, D) view
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    length = tl.maximum(end - start, 0)
    for i in range(0, tl.cdiv(length, BLOCK_N)):
        offset = i * BLOCK_N + offs_n
        valid = offset < length
        k = k_desc.load([base + start + i * BLOCK_N, 0])
        v = v_desc.load([base + start + i * BLOCK_N, 0])
        v = tl.where(valid[:, None], v, 0.0)  # rows past the span (another pair's keys) never enter the sums
        scores = dot_acc(q, tl.trans(k), tl.zeros([BLOCK_R, BLOCK_N], tl.float32), DOT_FP32)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(scores - safe_max[:, None])
        alpha = tl.math.exp2(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = dot_acc(p.to(v.dtype), v, acc, DOT_FP32)
        row_max = new_max
    if DIRECT:
        denominator = tl.where(row_sum > 0.0, row_sum, 1.0)
        out = tl.where(row_sum[:, None] > 0.0, acc / denominator[:, None], 0.0)
        out_rows = out_ptr + batch64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask_r[:, None])
        if slot == 0:
            offs_k = tl.arange(0, BLOCK_K)
            row = tl.load(group_ptr + batch * stride_gb + offs_k * stride_gk, mask=offs_k < num_selected, other=-1)
            for h0 in range(0, num_groups * ratio, BLOCK_R):
                zero_heads = h0 + offs_r
                selected = tl.sum((row[None, :] == (zero_heads // ratio)[:, None]).to(tl.int32), axis=1) > 0
                zero_mask = (~selected & (zero_heads < num_groups * ratio))[:, None]
                zero_rows = out_ptr + batch64 * stride_ob + zero_heads[:, None] * stride_oh + offs_d[None, :]
                tl.store(zero_rows, tl.zeros([BLOCK_R, BLOCK_D], out_ptr.dtype.element_ty), mask=zero_mask)
    else:
        rows = (pair * num_splits + split).to(tl.int64) * ratio + offs_r
        tl.store(max_ptr + rows, row_max, mask=mask_r)
        tl.store(sum_ptr + rows, row_sum, mask=mask_r)
        tl.store(acc_ptr + rows[:, None] * head_dim + offs_d[None, :], acc, mask=mask_r[:, None])


def tma_attention(query, key_cache, value_cache, group_index, span, scale, *, block_n, warps, stages, splits):
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, num_groups, seq_len, head_dim = key_cache.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    num_heads = query.shape[1]
    ratio = num_heads // num_groups
    num_selected = group_index.shape[1]
    pairs = batch * num_selected
    device = query.device
    out = torch.empty(query.shape, device=device, dtype=query.dtype)
    direct = splits == 1
    if direct:
        acc, mx, sm = (torch.empty(0, device=device, dtype=torch.float32) for _ in range(3))
    else:
        acc = torch.empty((pairs, splits, ratio, head_dim), device=device, dtype=torch.float32)
        mx = torch.empty((pairs, splits, ratio), device=device, dtype=torch.float32)
        sm = torch.empty((pairs, splits, ratio), device=device, dtype=torch.float32)
    rows = batch * num_groups * seq_len
    k_desc = TensorDescriptor(key_cache, [rows, head_dim], [head_dim, 1], [block_n, head_dim])
    v_desc = TensorDescriptor(value_cache, [rows, head_dim], [head_dim, 1], [block_n, head_dim])
    block_r = max(16, triton.next_power_of_2(ratio))
    block_k = max(16, triton.next_power_of_2(num_selected))
    _tma_kernel[(pairs, splits)](
        query, k_desc, v_desc, group_index, span, out, acc, mx, sm,
        float(scale) * sa._LOG2E, num_selected, num_groups, ratio, seq_len, head_dim, splits,
        query.stride(0), query.stride(1), group_index.stride(0), group_index.stride(1),
        span.stride(0) if span.shape[0] > 1 else 0, span.stride(1), out.stride(0), out.stride(1),
        DIRECT=int(direct), DOT_FP32=int(device.type == "cpu"), BLOCK_R=block_r, BLOCK_N=block_n,
        BLOCK_D=head_dim, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if not direct:
        sa._launch_merge(
            (acc, mx, sm), group_index, out, num_groups=num_groups, num_selected=num_selected, all_groups=False
        )
    return out


def check() -> int:
    """CPU, TRITON_INTERPRET=1: the tma kernel equals the op on small shapes, split and unsplit."""
    torch.manual_seed(0)
    for batch, groups, ratio, seq, k, splits in [(2, 4, 2, 96, 2, 1), (3, 2, 4, 70, 1, 3), (2, 4, 1, 64, 4, 2)]:
        kc = torch.randn(batch, groups, seq, 64)
        vc = torch.randn(batch, groups, seq, 64)
        q = torch.randn(batch, groups * ratio, 1, 64)
        gi = torch.rand(batch, groups).topk(k, dim=1).indices
        mask = torch.zeros(batch, 1, 1, seq, dtype=torch.bool)
        mask[0, ..., 5:41] = True
        mask[1:, ..., : seq - 3] = True
        span = sa.key_span(mask)
        want = sa.selective_attention_reference(q, kc, vc, gi, mask, 0.125)
        got = tma_attention(q, kc, vc, gi, span, 0.125, block_n=16, warps=4, stages=2, splits=splits)
        err = (got - want).abs().max().item()
        print(f"check B={batch} G={groups} R={ratio} S={seq} k={k} splits={splits}: max |diff| {err:.2e}")
        if err > 1e-4:
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--rep", type=float, default=30.0)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    if args.check:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--check runs under TRITON_INTERPRET=1"
        return check()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_selective_attention as bsa

    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    print("shape | pairs | cuDNN all groups ms TB/s | table cfg s ms TB/s | nomask ms TB/s | tma variants ms TB/s")
    for spec in args.shapes:
        model, batch, valid_len, k = bsa.grid_point(spec)
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        inputs = bsa.make_inputs(model, batch, valid_len)
        span = sa.key_span(inputs.mask)
        nbytes = bsa.ours_bytes(inputs, k)
        gi = bsa.random_groups(batch, num_groups, k)
        table = sa.config_for(
            num_heads // num_groups, head_dim, device, pairs=batch * k, cache_len=inputs.key_cache.shape[2]
        )
        splits = sa.num_splits_for(table, batch * k, inputs.key_cache.shape[2], device)

        def op(mask, inputs=inputs, gi=gi, span=span, table=table):
            return lambda: sa.launch_selective_attention(
                inputs.query, inputs.key_cache, inputs.value_cache, gi, mask, inputs.scale, span, config=table
            )

        reference = op(inputs.mask)().float()
        calls = {"table": op(inputs.mask), "nomask": op(None)}
        for block_n, warps, stages in TMA_BLOCKS:

            def tma(block_n=block_n, warps=warps, stages=stages, inputs=inputs, gi=gi, span=span, splits=splits):
                return tma_attention(
                    inputs.query, inputs.key_cache, inputs.value_cache, gi, span, inputs.scale,
                    block_n=block_n, warps=warps, stages=stages, splits=splits,
                )  # fmt: skip

            try:
                diff = (tma().float() - reference).abs().max().item()
            except Exception as error:  # out of resources, API
                print(f"  tma {block_n}/{warps}/{stages}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            if diff > 5e-2:
                print(f"  tma {block_n}/{warps}/{stages}: max |diff| {diff} -- WRONG", flush=True)
                continue
            calls[f"tma {block_n}/{warps}/{stages}"] = tma
        times = {name: [] for name in calls}
        times["cudnn"] = []
        for _ in range(2):  # alternating rounds: best of two each
            for name, call in calls.items():
                times[name].append(bsa.time_ms(call, warmup=5, rep=args.rep))
            times["cudnn"].append(bsa.time_ms(bsa.cudnn_dense(inputs), warmup=5, rep=args.rep))
        best = {name: min(values) for name, values in times.items()}
        cudnn_tbs = bsa.dense_bytes(inputs) / best["cudnn"] / 1e9
        parts = [f"{spec} | {batch * k} | cuDNN {best['cudnn']:.4f} {cudnn_tbs:.2f}"]
        parts.append(f"table {table.block_n}/{table.num_warps}/{table.num_stages} s{splits} "
                     f"{best['table']:.4f} {nbytes / best['table'] / 1e9:.2f}")  # fmt: skip
        for name in calls:
            if name != "table":
                parts.append(f"{name} {best[name]:.4f} {nbytes / best[name] / 1e9:.2f}")
        print(" | ".join(parts), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
