"""Does cuBLAS F.linear in bf16 equal the exact sum on small-integer inputs? (GPU only.)

    python benchmarks/probe_skinny_fallback.py

Session 25's GPU suite failed tests/ops/test_skinny_linear.py::test_op_equals_f_linear at M=5, K=14336: the op
(which falls back to F.linear below MIN_ROWS) was one ulp off the exact sum. This counts, for 20 random problems at
each M, the outputs where F.linear differs from the exact sum with and without cuBLAS's reduced-precision bf16
reduction, and where the op differs from F.linear. Result on the H200 (results/probe_skinny_fallback_h200_s26.log):
with the reduction allowed (the default) F.linear differs in all 60 problems at M = 5, 17 and 32 (360-1,500 outputs of
20,500-131,200), in none at M = 1 (cuBLAS's GEMV), and never without the reduction; the op always equals F.linear
(the log is the last 15 lines of the run's output, of an inline copy of this script).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import polar_compile.ops.skinny_linear  # noqa: F401  (registers polar::skinny_linear)
from polar_compile import bench


def differences(rows: int, width: int = 14336, columns: int = 4100) -> tuple[int, int, int]:
    x = torch.randint(-2, 3, (rows, width)).cuda().bfloat16()
    weight = torch.randint(-2, 3, (columns, width)).cuda().bfloat16()
    exact = F.linear(x.double(), weight.double()).bfloat16()
    matmul = torch.backends.cuda.matmul
    default = F.linear(x, weight)
    allowed = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        full_precision = F.linear(x, weight)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = allowed
    op = torch.ops.polar.skinny_linear(x, weight, None)
    return (
        int((default != exact).sum()),
        int((full_precision != exact).sum()),
        int((op != default).sum()),
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench.require_cuda(__file__)
    torch.manual_seed(0)
    cases = 0
    for _ in range(20):
        for rows in (5, 1, 17, 32):
            default, full_precision, op = differences(rows)
            if default or full_precision or op:
                cases += 1
                print(f"rows {rows}: F.linear != exact at {default}, without reduced-precision reduction at "
                      f"{full_precision}, op != F.linear at {op}")  # fmt: skip
    print("cases with a difference:", cases)


if __name__ == "__main__":
    main()
