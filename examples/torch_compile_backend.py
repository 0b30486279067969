"""Use the "polar" torch.compile backend directly, in your own static-cache decode loop.

optimize() attaches the routers; torch.compile(..., backend="polar") then rewrites every decode step
(one query token) and leaves prefill dense.

    python examples/torch_compile_backend.py
"""

import inspect

import torch
from transformers import StaticCache

import polar_compile
from polar_compile.demo import shipped_routers_path

model, tokenizer = polar_compile.load_smollm2()
polar_compile.optimize(model, polar_compile.load_routers(shipped_routers_path(), model))
on_gpu = torch.cuda.is_available()
decode = torch.compile(
    model,
    backend="polar",
    fullgraph=True,
    **({"mode": "reduce-overhead"} if on_gpu else {"options": {"polar.inductor": False}}),
)

ids = tokenizer("The three primary colours are", return_tensors="pt")["input_ids"]
cache = StaticCache(config=model.config, max_cache_len=64)
# transformers 5.25 renamed forward's past_key_values to cache (the old name warns, and goes in 5.40)
cache_kwargs = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
with torch.no_grad():
    logits = model(ids, **cache_kwargs, use_cache=True).logits  # dense prefill, eager
    tokens = [int(logits[0, -1].argmax())]
    for step in range(16):
        position = torch.tensor([ids.shape[1] + step])
        out = decode(torch.tensor([[tokens[-1]]]), **cache_kwargs, cache_position=position, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
print(tokenizer.decode(tokens))
print(polar_compile.explain(model))
