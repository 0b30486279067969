"""The dense paths of polar::selective_up / selective_down (LaunchConfig.dense) piece by piece, against the dense
baseline and the gather kernels, at density 1.0 (GPU; us, one CUDA graph of 4 calls, bench_selective_gemm.time_calls).

    python benchmarks/probe_dense_down.py > probe_dense_down.log

Per MLP shape of issue 4 and M (index: a random permutation of all F neurons):
  down  base        F.linear(y, W row-major (d, F), b): the benchmark's dense baseline
        C_addmm     torch.addmm(b, full (M, F), W_nm.t()): the product of the row-major dense path
        C_mm        the same without the bias (torch.mm)
        B_mm        torch.mm(W_nm, full_t (F, M padded)): the product of the transposed dense path
        head        the list heads (torch.full of F int32)
        link        _link_entries_kernel
        fill, fill_t  _fill_columns_kernel into (M, F) / (F, M padded)
        tr_bias     _transpose_bias_kernel (d, M padded) -> (M, d)
        path, path_t  the whole dense path, row-major / transposed
        kernel      the table's gather kernel (launch_selective_down with config_for(..., no F): never dense)
  up    base        F.linear(x, W_up) (gated: the fused (2F, d) weight)
        path        the dense path (LaunchConfig.dense)
        kernel      the table's gather kernel
W_nm is the neuron-major layout prepare_down_weight makes (what the op reads).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_gemm as bsg

from polar_compile.ops import selective_gemm as sg

DENSE = sg.LaunchConfig(dense=True)


def time_us(fn) -> float:
    return bsg.time_calls([fn]) * 1e3


def down_pieces(M: int, d: int, f: int, bias: bool) -> dict[str, float]:
    dtype, device = torch.bfloat16, torch.device("cuda")
    w_nm = (torch.randn(f, d, device=device, dtype=dtype) * f**-0.5).t()
    w_row = torch.randn(d, f, device=device, dtype=dtype) * f**-0.5
    b = torch.randn(d, device=device, dtype=dtype) if bias else None
    y = sg.empty_hidden(M, f, device=device, dtype=dtype).normal_()
    index = torch.randperm(f, device=device)
    full = torch.randn(M, f, device=device, dtype=dtype)
    padded = -(-M // 16) * 16
    full_t = torch.randn(f, padded, device=device, dtype=dtype)
    out_t = torch.mm(w_nm, full_t)
    out = torch.empty(M, d, device=device, dtype=dtype)
    head = torch.full((f,), -1, device=device, dtype=torch.int32)
    following = torch.empty(f, device=device, dtype=torch.int32)
    block_m = min(triton.next_power_of_2(M), 16)

    def link():
        head.fill_(-1)  # the real path's torch.full, here a fill into the same buffer
        sg._link_entries_kernel[(triton.cdiv(f, 1024),)](index, head, following, f, f, BLOCK=1024)

    def fill(target, strides):
        return lambda: sg._fill_columns_kernel[(triton.cdiv(f, 128), triton.cdiv(M, block_m))](
            y, head, following, target, M, f, y.stride(0), y.stride(1), *strides, BLOCK_M=block_m, BLOCK_N=128
        )

    def tr_bias():
        rows = min(max(triton.next_power_of_2(M), 16), 64)
        sg._transpose_bias_kernel[(triton.cdiv(d, 64), triton.cdiv(M, rows))](
            out_t, b if b is not None else out_t, out, M, d, out_t.stride(0), out.stride(0),
            HAS_BIAS=int(b is not None), BLOCK_D=64, BLOCK_M=rows,
        )  # fmt: skip

    link()
    expected = F.linear(y.float(), w_nm[:, index].float(), None if b is None else b.float())
    for transposed in (False, True):  # both dense paths right before they are timed
        got = sg._dense_down(y, w_nm, index, b, out, transposed=transposed).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    table = sg.config_for("down", M, d, f)
    return dict(
        base=time_us(lambda: F.linear(y, w_row, b)),
        C_addmm=time_us(lambda: torch.addmm(b, full, w_nm.t()) if b is not None else torch.mm(full, w_nm.t())),
        C_mm=time_us(lambda: torch.mm(full, w_nm.t())),
        B_mm=time_us(lambda: torch.mm(w_nm, full_t)),
        head=time_us(lambda: torch.full((f,), -1, device=device, dtype=torch.int32)),
        link=time_us(link),
        fill=time_us(fill(full, (f, 1))),
        fill_t=time_us(fill(full_t, (1, padded))),
        tr_bias=time_us(tr_bias),
        path=time_us(lambda: sg._dense_down(y, w_nm, index, b, out)),
        path_t=time_us(lambda: sg._dense_down(y, w_nm, index, b, out, transposed=True)),
        kernel=time_us(lambda: sg.launch_selective_down(y, w_nm, index, b, config=table)),
    )


def up_pieces(M: int, d: int, f: int, gated: bool, bias: bool) -> dict[str, float]:
    dtype, device = torch.bfloat16, torch.device("cuda")
    weight = torch.randn(2 * f if gated else f, d, device=device, dtype=dtype) * d**-0.5
    b = torch.randn(f, device=device, dtype=dtype) if bias else None
    x = torch.randn(M, d, device=device, dtype=dtype)
    index = torch.randperm(f, device=device)
    op = "gated_up" if gated else "up"
    table = sg.config_for(op, M, d, f)

    def run(config):
        if gated:
            return lambda: sg.launch_selective_gated_up(x, weight[:f], weight[f:], index, config=config)
        return lambda: sg.launch_selective_up(x, weight, b, index, sg.ACTIVATIONS["relu"], config=config)

    return dict(base=time_us(lambda: F.linear(x, weight)), path=time_us(run(DENSE)), kernel=time_us(run(table)))


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for shape in bsg.SHAPES:
        for M in (64, 128, 129, 256):
            down = down_pieces(M, shape.d, shape.num_neurons, shape.bias)
            print(f"{shape.name:10s} M={M:3d} down " + " ".join(f"{k}={v:.1f}" for k, v in down.items()), flush=True)
            up = up_pieces(M, shape.d, shape.num_neurons, shape.gated, shape.bias)
            print(f"{shape.name:10s} M={M:3d} up   " + " ".join(f"{k}={v:.1f}" for k, v in up.items()), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
