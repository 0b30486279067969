"""Decode SmolLM2-135M with Polar Sparsity through generate(): the three lines a user adds.

python examples/generate_sparse.py
"""

import torch

import polar_compile
from polar_compile.demo import shipped_routers_path

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = polar_compile.load_smollm2(
    dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device
)

# --- the polar_compile part -------------------------------------------------------------------------
routers = polar_compile.load_routers(shipped_routers_path(), model)  # checks the file was made for this model
model = polar_compile.optimize(model, routers, polar_compile.SparsityConfig(attention_density=2 / 3))
# -----------------------------------------------------------------------------------------------------

tokenizer.padding_side = "left"
inputs = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True).to(device)
out = model.generate(**inputs, max_new_tokens=20, do_sample=False, cache_implementation="static")
for row in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True):
    print(repr(row))
print(polar_compile.explain(model))
