#!/usr/bin/env bash
# Second batch of oracle_accuracy systems, one process per system, at questions=60 (paired against the first
# 60 questions of the questions=150 dense entry: the same questions). Run from the repository root.
set -euo pipefail
OUT=benchmarks/results/oracle_accuracy.json
for system in router:2:r_gqa_post100k.safetensors post:mha:8 pre:mha:8 router:2 post:mha:7 pre:mha:7; do
    PYTHONPATH=. python benchmarks/oracle_accuracy.py --systems "$system" --texts 48 --questions 60 --out "$OUT"
done
