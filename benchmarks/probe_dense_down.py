"""The dense path of polar::selective_down (LaunchConfig.dense): which cuBLAS formulation, and what the scatter costs.

    python benchmarks/probe_dense_down.py [--m 128 256] > probe_dense_down.log     # GPU

For the three MLP shapes of issue 4 and M in (16, 64, 65, 128, 256), times (us, one CUDA graph of 4 calls,
bench_selective_gemm.time_calls):
  A_lin_T     F.linear(yT[:, :M].t(), W, b): the product read from the transposed scatter buffer yT (F, M padded),
              what _dense_down runs where selective_gemm._product_into_out says
  B_mm_wT     torch.mm(W, yT): the transposed product, what _dense_down runs elsewhere (then a bias + transpose pass)
  C_lin_N_nm  F.linear(y_full (M, F) contiguous, W neuron-major, b)
  D_dense_row F.linear(y_full, W row-major (d, F), b): the benchmark's dense baseline
  zeros       the zeroed (F, M padded) buffer alone
  path        the whole dense path: launch_selective_down with LaunchConfig.dense (owner fill, claim, scatter
              and zero rows, the repeats pass, product, bias)
  up_base     F.linear(x, W_up) and its activation: the up op's dense baseline
  up_path     launch_selective_up with LaunchConfig.dense (x padded unless M is a multiple of 16, the transposed
              product, the gather pass)
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_gemm as bsg

from polar_compile import bench
from polar_compile.ops import selective_gemm as sg

SHAPES = (("opt-66b", 9216, 36864), ("opt-6.7b", 4096, 16384), ("llama-3-8b", 4096, 14336))

DENSE = sg.LaunchConfig(dense=True)


def time_us(fn) -> float:
    """us per call: 4 calls in one CUDA graph, timed by bench_selective_gemm.time_calls."""
    return bsg.time_calls([fn]) * 1e3


def probe(M: int, f: int, weight, w_row, bias) -> dict[str, float]:
    dtype, device = weight.dtype, weight.device
    padded = -(-M // 16) * 16
    full_t = torch.randn(f, padded, device=device, dtype=dtype)
    full = torch.randn(M, f, device=device, dtype=dtype)
    y = sg.empty_hidden(M, f, device=device, dtype=dtype).normal_()
    index = torch.randperm(f, device=device)
    x = torch.randn(M, weight.shape[0], device=device, dtype=dtype)
    w_up = weight.t()  # (F, d) contiguous: the up weight as nn.Linear lays it (w_nm)
    relu = sg.ACTIVATIONS["relu"]
    return dict(
        A_lin_T=time_us(lambda: F.linear(full_t[:, :M].t(), weight, bias)),
        B_mm_wT=time_us(lambda: torch.mm(weight, full_t)),
        C_lin_N_nm=time_us(lambda: F.linear(full, weight, bias)),
        D_dense_row=time_us(lambda: F.linear(full, w_row, bias)),
        zeros=time_us(lambda: torch.zeros((f, padded), device=device, dtype=dtype)),
        path=time_us(lambda: sg.launch_selective_down(y, weight, index, bias, config=DENSE)),
        up_base=time_us(lambda: torch.relu(F.linear(x, w_up))),
        up_path=time_us(lambda: sg.launch_selective_up(x, w_up, None, index, relu, config=DENSE)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[16, 64, 65, 128, 256], help="batch rows to time")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    dtype, device = torch.bfloat16, torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, d, f in SHAPES:
        w_nm = torch.randn(f, d, device=device, dtype=dtype) * f**-0.5  # (F, d) contiguous
        weight = w_nm.t()  # (d, F) neuron-major: what the op gets after prepare_down_weight
        w_row = torch.randn(d, f, device=device, dtype=dtype) * f**-0.5
        bias = torch.randn(d, device=device, dtype=dtype)
        for M in args.m:
            times = probe(M, f, weight, w_row, bias)
            print(f"{name:10s} M={M:3d} " + " ".join(f"{k}={v:6.1f}" for k, v in times.items()), flush=True)
        del w_nm, weight, w_row
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
