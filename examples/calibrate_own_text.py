"""Calibrate routers for a model on your own text, save them, and load them back.

python examples/calibrate_own_text.py
"""

import polar_compile
from polar_compile.config import CalibrationConfig

model, tokenizer = polar_compile.load_smollm2()
texts = polar_compile.load_wiki_texts("train")[:400]  # any list of strings works
held_out = polar_compile.load_wiki_texts("validation")  # other text: picks the layers to keep dense (within +5% ppl)
config = CalibrationConfig(tokens=20_000, density=2 / 3, selection_windows=16)
routers = polar_compile.calibrate(model, texts, config, tokenizer=tokenizer, selection_texts=held_out)
polar_compile.save_routers(routers, "my_routers.safetensors")
again = polar_compile.load_routers("my_routers.safetensors", model)  # refuses a file made for another model
print({layer: round(recall, 3) for layer, recall in again.metadata["recall"].items()})
print("kept dense by optimize:", again.dense_layers)
