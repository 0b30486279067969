"""The dense down path of polar::selective_down piece by piece (H100, us; one CUDA graph of 4 calls each).

    python benchmarks/probe_dense_down_pieces.py     # GPU

zeros / ownerfill: the buffers; claim: _claim_rows_kernel; scJxM: _scatter_rows_kernel (owner stores) at BLOCK_J x
BLOCK_M (w8: 8 warps); rep32x128: the repeats pass with no repeats; mm: outT = W @ yT; addT: bias + transpose to
(M, d); path: the whole dense path (launch_selective_down, LaunchConfig.dense). Index: a random permutation of
all F neurons.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_gemm as bsg

from polar_compile import bench
from polar_compile.ops import selective_gemm as sg

DENSE = sg.LaunchConfig(dense=True)


def time_us(fn) -> float:
    """us per call: 4 calls in one CUDA graph, timed by bench_selective_gemm.time_calls."""
    return bsg.time_calls([fn]) * 1e3


def pieces(M: int, f: int, weight, bias) -> dict[str, float]:
    dtype, device = weight.dtype, weight.device
    padded = -(-M // 16) * 16
    y = sg.empty_hidden(M, f, device=device, dtype=dtype).normal_()
    index = torch.randperm(f, device=device)
    owner = torch.full((f,), -1, device=device, dtype=torch.int32)
    full_t = torch.zeros((f, padded), device=device, dtype=dtype)
    out_t = torch.mm(weight, full_t)
    out = torch.empty((M, weight.shape[0]), device=device, dtype=dtype)

    def claim():
        sg._claim_rows_kernel[(triton.cdiv(f, 1024),)](index, owner, f, f, BLOCK=1024)

    def scatter(block_j, block_m, repeats=0, num_warps=4):
        def run():
            sg._scatter_rows_kernel[(triton.cdiv(f, block_j),)](
                y, index, owner, full_t, M, padded, f, f, triton.cdiv(f, block_j), y.stride(0), y.stride(1),
                full_t.stride(0),
                REPEATS=repeats, BLOCK_J=block_j, BLOCK_M=block_m, num_warps=num_warps,
            )  # fmt: skip

        return run

    claim()
    return dict(
        zeros=time_us(lambda: torch.zeros((f, padded), device=device, dtype=dtype)),
        ownerfill=time_us(lambda: torch.full((f,), -1, device=device, dtype=torch.int32)),
        claim=time_us(claim),
        sc32x128=time_us(scatter(32, 128)),
        sc64x64=time_us(scatter(64, 64)),
        sc16x128=time_us(scatter(16, 128)),
        sc32x64=time_us(scatter(32, 64)),
        sc32x128w8=time_us(scatter(32, 128, num_warps=8)),
        rep32x128=time_us(scatter(32, 128, repeats=1)),
        mm=time_us(lambda: torch.mm(weight, full_t)),
        addT=time_us(lambda: torch.add(out_t[:, :M].t(), bias, out=out)),
        path=time_us(lambda: sg.launch_selective_down(y, weight, index, bias, config=DENSE)),
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench.require_cuda(__file__)
    dtype, device = torch.bfloat16, torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, d, f in (("opt-66b", 9216, 36864), ("llama-3-8b", 4096, 14336)):
        weight = (torch.randn(f, d, device=device, dtype=dtype) * f**-0.5).t()
        bias = torch.randn(d, device=device, dtype=dtype)
        for M in (64, 256):
            times = pieces(M, f, weight, bias)
            print(f"{name} M={M} " + " ".join(f"{k}={v:.1f}" for k, v in times.items()), flush=True)
        del weight
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
