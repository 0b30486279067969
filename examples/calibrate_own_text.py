"""Calibrate routers for a model on your own text, save them, and load them back.

python examples/calibrate_own_text.py
"""

import polar_compile
from polar_compile.config import CalibrationConfig

model, tokenizer = polar_compile.load_smollm2()
texts = polar_compile.load_wiki_texts("train")[:400]  # any list of strings works
routers = polar_compile.calibrate(model, texts, CalibrationConfig(tokens=20_000, density=2 / 3), tokenizer=tokenizer)
polar_compile.save_routers(routers, "my_routers.safetensors")
again = polar_compile.load_routers("my_routers.safetensors", model)  # refuses a file made for another model
print({layer: round(recall, 3) for layer, recall in again.metadata["recall"].items()})
