"""Does polar at density 1.0 reproduce dense greedy tokens through ``generate()``?

    python benchmarks/greedy_check.py --model llama3-8b --batch 64 --context 1024 --dtypes float32,bfloat16

For each dtype, on one random-weight model: stock HF ``generate(cache_implementation="static")`` (its own
compile), HF eager (``disable_compile``: a second dense implementation) and polar at density 1.0, all greedy
from the same prompts. Prints, against stock, the share of generated tokens that match, how many sequences
are identical end to end, and the mean position of the first difference; and polar against eager.

Why two dtypes: a random-weight model's next-token logits are nearly flat (with a 128k vocabulary the top-2
gap is a few tenths of a logit), so in bf16 two correct dense implementations already disagree (compare the
eager row); once one token differs the sequences part for good. In fp32 the rounding noise is ~1e-6 of a
logit and the tokens must match. The polar fp32 path runs the same Triton kernel with ieee products.
"""

from __future__ import annotations

import argparse
import time

import torch

import polar_compile
from polar_compile import bench
from polar_compile.compiler import restore
from polar_compile.config import SparsityConfig


def generate(model, ids, new_tokens: int, chunk: int, compiled: bool) -> tuple[torch.Tensor, float]:
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, cache_implementation="static", disable_compile=not compiled)  # fmt: skip
    if chunk:
        kwargs["prefill_chunk_size"] = chunk
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return out[:, ids.shape[1] :].cpu(), time.perf_counter() - start


def compare(tokens: torch.Tensor, stock: torch.Tensor) -> str:
    equal = tokens == stock
    differs = ~equal
    steps = tokens.shape[1]
    first = torch.where(differs.any(1), differs.float().argmax(1), torch.full((tokens.shape[0],), float(steps)))
    return (f"tokens equal {equal.float().mean().item():7.2%}  sequences identical {int(equal.all(1).sum())}/"
            f"{tokens.shape[0]}  mean first difference at step {first.mean().item():.1f} of {steps}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", help=f"one of {', '.join(bench.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__, flush=True)
    lines = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = bench.build_model(args.model, args.context, dtype=dtype, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        prompt = args.context - args.new_tokens
        ids = torch.randint(10, model.config.vocab_size, (args.batch, prompt), device=device, generator=generator)
        torch._dynamo.reset()
        stock, seconds = generate(model, ids, args.new_tokens, args.prefill_chunk, compiled=True)
        print(f"{dtype_name} stock: {seconds:.0f} s", flush=True)
        eager, seconds = generate(model, ids, args.new_tokens, args.prefill_chunk, compiled=False)
        print(f"{dtype_name} eager: {seconds:.0f} s", flush=True)
        torch._dynamo.reset()
        polar_compile.optimize(model, bench.random_routers(model, 1.0), SparsityConfig(attention_density=1.0))
        polar, seconds = generate(model, ids, args.new_tokens, args.prefill_chunk, compiled=True)
        print(f"{dtype_name} polar-1.0: {seconds:.0f} s", flush=True)
        print(str(polar_compile.explain(model)).splitlines()[0], flush=True)
        restore(model)
        del model
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
        shape = f"{args.model} B={args.batch} ctx={args.context} {dtype_name:8s}"
        found = [
            f"{shape} eager     vs stock: {compare(eager, stock)}",
            f"{shape} polar-1.0 vs stock: {compare(polar, stock)}",
            f"{shape} polar-1.0 vs eager: {compare(polar, eager)}",
        ]
        print("\n".join(found), flush=True)  # now: a later dtype may not finish within a GPU session's budget
        lines += found
    print("\n=== greedy tokens against stock HF ===")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
