"""Call the polar:: ops yourself, e.g. from your own serving loop, without optimize() or the compiler.

`import polar_compile.ops` registers them as torch.ops.polar.*; the Python wrappers below add defaults and
keyword arguments. On a CUDA GPU they run the Triton kernels in bf16, elsewhere the plain-PyTorch references.

    python examples/use_the_ops.py
"""

import torch
import torch.nn.functional as F

from polar_compile.ops.selective_attention import key_span, selective_attention
from polar_compile.ops.selective_gemm import batch_union_topk, prepare_down_weight, selective_down, selective_gated_up

device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
torch.manual_seed(0)

# --- Attention: one decode token per sequence over an HF static cache (B, Hkv, S_max, D), GQA 4:1 ---------
B, Hq, Hkv, S_max, D = 4, 16, 4, 256, 64
query = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)  # HF's (B, Hq, 1, D) decode query
key_cache = torch.randn(B, Hkv, S_max, D, device=device, dtype=dtype)
value_cache = torch.randn(B, Hkv, S_max, D, device=device, dtype=dtype)
lengths = torch.tensor([256, 200, 97, 1], device=device)  # valid keys a sequence (left padding in front)
slots = torch.arange(S_max, device=device)
mask = (slots >= S_max - lengths[:, None])[:, None, None, :]  # HF's boolean (B, 1, 1, S_max) mask
group_index = torch.stack([torch.randperm(Hkv, device=device)[:2] for _ in range(B)])  # 2 of 4 groups each

out = selective_attention(query, key_cache, value_cache, group_index, mask, key_span=key_span(mask))

# What it equals: SDPA over the valid keys for the query heads of a selected group, exactly 0 for the others.
dense = F.scaled_dot_product_attention(query, key_cache, value_cache, attn_mask=mask, enable_gqa=True)
keep = torch.zeros(B, Hkv, dtype=torch.bool, device=device).scatter_(1, group_index, True)
keep = keep.repeat_interleave(Hq // Hkv, dim=1)[:, :, None, None]
torch.testing.assert_close(out, torch.where(keep, dense, 0.0), atol=2e-2, rtol=2e-2)
assert (out[~keep.expand_as(out)] == 0).all()
print(f"selective_attention on {device}: {tuple(out.shape)}, 2 of {Hkv} KV groups read per sequence; matches SDPA")

# --- MLP: one neuron index shared by the batch (the union of what each row's router asks for) --------------
M, d, num_neurons, k = 8, 256, 1024, 256
x = torch.randn(M, d, device=device, dtype=dtype)
gate = torch.nn.Linear(d, num_neurons, bias=False, device=device, dtype=dtype)
up = torch.nn.Linear(d, num_neurons, bias=False, device=device, dtype=dtype)
down = torch.nn.Linear(num_neurons, d, bias=False, device=device, dtype=dtype)
prepare_down_weight(down)  # once: the down weight becomes neuron-major in place (no second copy kept)

scores = torch.randn(M, num_neurons, device=device, dtype=dtype)  # stand-in for a router's per-row scores
index = batch_union_topk(scores, k)  # (k,) neurons: a Python int k, so every shape is static
hidden = selective_gated_up(x, gate.weight, up.weight, index)  # (M, k): reads k rows of gate and up
out = selective_down(hidden, down.weight, index)  # (M, d): reads k columns of down

# What it equals: the dense gated MLP over those k neurons only.
reference = (F.silu(x @ gate.weight[index].T) * (x @ up.weight[index].T)) @ down.weight[:, index].T
torch.testing.assert_close(out, reference, atol=5e-2, rtol=5e-2)
print(f"selective MLP on {device}: {k} of {num_neurons} neurons read for a batch of {M}; matches the dense MLP")
