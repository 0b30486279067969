"""How long calibration takes on a model shape with random weights (recall is meaningless there; time is not).

    python benchmarks/time_calibration.py --model llama3-8b --tokens 400000          # GPU (issue target: <= 10 min)

The token stream is random ids in batches of ``--batch-size`` x ``--sequence-length`` (collection cost does not
depend on the text). Prints collection, training and total seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from polar_compile import bench
from polar_compile.config import CalibrationConfig
from polar_compile.routers.calibrate import calibrate


def random_batches(vocab: int, batch: int, length: int, device):
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", help=f"one of {', '.join(bench.MODEL_SHAPES)}")
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if on_gpu else "cpu"
    model = bench.build_model(args.model, args.sequence_length, torch.bfloat16 if on_gpu else torch.float32, device)
    config = CalibrationConfig(tokens=args.tokens, density=args.density, batch_size=args.batch_size,
                               sequence_length=args.sequence_length)  # fmt: skip
    start = time.perf_counter()
    routers = calibrate(model, random_batches(model.config.vocab_size, args.batch_size, args.sequence_length, device),
                        config)  # fmt: skip
    total = time.perf_counter() - start
    seconds = routers.metadata["seconds"]
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{args.model} on {name}: {routers.metadata['calibration_tokens']} tokens, collect {seconds['collect']} s,"
          f" train {seconds['train']} s, total {total:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
