#!/usr/bin/env bash
# Build measured tables on a Jetson Orin NX (JetPack 6.x, L4T r36).
#
# The Orin NX's 8/16 GB are shared by CPU and GPU: llama2-7b fp16 (13.5 GB of weights) does not
# fit whole on the 16 GB module next to the OS; components fit. Use tinyllama-1.1b for
# whole-model validation rows, or llama2-7b components only.
# Usage: scripts/jetson-orin-nx.sh [MODEL] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tinyllama-1.1b}
OUT=${2:-lut}
VENV=${VENV:-.venv-jetson}

cat /proc/device-tree/model; echo
head -1 /etc/nv_tegra_release
# Maximum power mode and locked clocks make tables repeatable (both need root and persist until reboot).
sudo nvpmodel -m 0
sudo nvpmodel -q
sudo jetson_clocks

python3 -m venv --system-site-packages "$VENV"
# PyPI's aarch64 torch wheels have no CUDA for Jetson: install NVIDIA's JetPack build first, e.g.
#   "$VENV/bin/pip" install torch --index-url https://pypi.jetson-ai-lab.io/jp6/cu126
# (pick the index matching your JetPack), then the project without touching torch:
"$VENV/bin/python" -c 'import torch; assert torch.cuda.is_available(), "install the JetPack CUDA build of torch first"'
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -m pip install --quiet "transformers>=5,<6" numpy pandas typer rich filelock pytest hypothesis

"$VENV/bin/python" -m pytest -q -m gpu
"$VENV/bin/amoeba-profile" build-lut --backend pytorch --device cuda --dtype float16 --model "$MODEL" \
    --out "$OUT" --prompt-len 128 --contexts 128,256,512 --whole "$( [ "$MODEL" = tinyllama-1.1b ] && echo 22x1,16x3/4 || echo '' )"
