#!/usr/bin/env bash
# Build measured tables on an NVIDIA RTX A5000 (or any CUDA GPU) box.
#
# Needs: Linux, an NVIDIA driver (nvidia-smi works), Python >= 3.10, make, ~20 GB free GPU memory
# for llama2-7b fp16 whole-model rows (components alone need < 2 GB).
# Usage: scripts/a5000.sh [MODEL] [OUT]      e.g. scripts/a5000.sh llama2-7b lut
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-llama2-7b}
OUT=${2:-lut}
VENV=${VENV:-.venv-cuda}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
python3 -m venv "$VENV"
# A CUDA build of torch (the default PyPI wheel on x86_64 Linux); keep it in the supported range.
"$VENV/bin/python" -m pip install --quiet "torch>=2.4,<2.14"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"

# GPU-marked tests first: they check CUDA-event timing on a tiny model.
"$VENV/bin/python" -m pytest -q -m gpu

# Clocks drift with temperature; for repeatable tables either lock them (needs root:
#   sudo nvidia-smi -lgc <max SM clock>) or accept drift, which interleaved rounds spread evenly.
"$VENV/bin/amoeba-profile" build-lut --backend pytorch --device cuda --dtype float16 --model "$MODEL" \
    --out "$OUT" --prompt-len 128,512 --contexts 128,512,1024,2048 --whole 32x1,28x7/8,24x3/4,20x5/8
"$VENV/bin/amoeba-profile" show --lut "$OUT/$( "$VENV/bin/python" -c 'from amoeba_profile.device import device_slug; print(device_slug("cuda"))')/pytorch/$MODEL-float16.csv"

# Both methods against generate() truth on this GPU (components vs difference, uniform and per-layer
# subnets), and the fitted per-layer cost by width: does pruning width pay under eager generate()?
"$VENV/bin/python" benchmarks/composition_error.py --model "$MODEL" --device cuda --contexts 128,512 \
    --decode-steps 32 --out "$OUT/bench" --json "$OUT/bench/composition-$MODEL.json"
