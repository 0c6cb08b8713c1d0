#!/usr/bin/env bash
# Measured tables on an NVIDIA RTX A5000 (or any CUDA box) for three deployment flows - eager
# PyTorch, TensorRT-LLM and MLC-LLM - each validated against whole-model truth, under OUT/<slug>/.
#
# Needs: Linux x86_64, an NVIDIA driver (nvidia-smi), Python 3.10 or 3.12 (TensorRT-LLM's wheels),
# the CUDA toolkit's nvcc on PATH (mlc_llm compile builds its kernels with it), libopenmpi-dev
# (TensorRT-LLM), ~20 GB free GPU memory for llama2-7b fp16 whole models, ~60 GB of disk for the
# three venvs and the compiled engines (~/.cache/amoeba-profile/artifacts).
# Usage: scripts/a5000.sh [MODEL] [OUT]      e.g. scripts/a5000.sh llama2-7b lut
# Environment: MLC_CUDA (cu128: the mlc-llm nightly wheel's CUDA, per MLC-LLM's install page),
# BENCH=1 (also run the components-vs-difference benchmark of the pytorch flow, ~1 h more).
#
# Each flow has its own venv: TensorRT-LLM pins its own torch and transformers 4.x, so the project
# goes into that venv without its dependencies. A flow that fails to install, build or validate is
# reported and skipped; the summary at the end says what each flow produced. The run ends by writing
# one archive to contribute (scripts/archive.sh): OUT/amoeba-profile-<slug>-<time>.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device-tables.sh
MODEL=${1:-llama2-7b}
OUT=${2:-lut}
MLC_CUDA=${MLC_CUDA:-cu128}
GRID=(--prompt-len 128,512 --contexts 128,512,1024,2048)
whole_subnets "$MODEL"  # WHOLE (any flow) and WHOLE_UNIFORM_HEADS (mlc-llm) validation rows
# The project's own dependencies other than torch and transformers (installed where a flow pins those).
LIGHT_DEPS=(numpy pandas typer rich filelock nvidia-ml-py scipy matplotlib pytest hypothesis)

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv || exit 1
# Clocks drift with temperature; for repeatable tables either lock them (needs root:
#   sudo nvidia-smi -lgc <max SM clock>) or accept drift, which interleaved rounds spread evenly.

venv() {  # DIR: a fresh venv with a current pip
    python3 -m venv "$1" && "$1/bin/python" -m pip install --quiet --upgrade pip
}

# pytorch (eager): the reference venv; it also profiles the device and names its folder.
PT=.venv-cuda
if venv "$PT" && "$PT/bin/python" -m pip install --quiet "torch>=2.4,<2.14" &&
        "$PT/bin/python" -m pip install --quiet -e ".[dev]"; then
    SLUG=$("$PT/bin/python" -c 'from amoeba_profile.device import device_slug; print(device_slug("cuda"))') || exit 1
    "$PT/bin/amoeba-profile" profile-device --device cuda --out "$OUT"  # OUT/<slug>/device.json
    keep_raw_outputs  # the libraries' raw outputs of this first run: OUT/<slug>/raw
    ARCHIVE_ENVS+=("pytorch=$PT/bin/python")
    "$PT/bin/python" -m pytest -q -m gpu  # CUDA-event timing on a tiny model (other flows skip here)
    build_and_validate pytorch "$PT/bin/amoeba-profile" "$PT/bin/python" "${GRID[@]}" \
        ${WHOLE:+--whole "$WHOLE"}
else
    echo "the pytorch venv failed to install: no device slug, nothing else can run" >&2
    exit 1
fi

# TensorRT-LLM from NVIDIA's package index (it brings its own torch and transformers).
TRT=.venv-trtllm
if venv "$TRT" && "$TRT/bin/python" -m pip install --quiet --extra-index-url https://pypi.nvidia.com/ tensorrt-llm &&
        "$TRT/bin/python" -m pip install --quiet --no-deps -e . &&
        "$TRT/bin/python" -m pip freeze | grep -iE '^(numpy|torch|transformers)==' > "$TRT/keep.txt" &&
        "$TRT/bin/python" -m pip install --quiet -c "$TRT/keep.txt" "${LIGHT_DEPS[@]}"; then
    ARCHIVE_ENVS+=("tensorrt-llm=$TRT/bin/python")
    build_and_validate tensorrt-llm "$TRT/bin/amoeba-profile" "$TRT/bin/python" "${GRID[@]}" \
        ${WHOLE:+--whole "$WHOLE"}
else
    record tensorrt-llm "install failed (pip install tensorrt-llm from NVIDIA's index; needs libopenmpi-dev); skipped"
fi

# MLC-LLM nightly wheels (MLC-LLM's install page). Only uniform shapes whose head count divides
# hidden_size run (MLC's LlamaModel asserts it): on llama2-7b every width below 1 prunes heads to
# 28/24/20 (TinyLlama's 3/4 and 5/8 to 24), so the table varies depth and FFN at full heads; its
# other rows are `unsupported`, and its whole-model rows prune depth only.
MLC=.venv-mlc
if command -v nvcc >/dev/null && venv "$MLC" && "$MLC/bin/python" -m pip install --quiet "torch>=2.4,<2.14" &&
        "$MLC/bin/python" -m pip install --quiet -e ".[dev]" &&
        "$MLC/bin/python" -m pip install --quiet --pre -U -f https://mlc.ai/wheels \
            "mlc-llm-nightly-$MLC_CUDA" "mlc-ai-nightly-$MLC_CUDA"; then
    ARCHIVE_ENVS+=("mlc-llm=$MLC/bin/python")
    "$MLC/bin/python" -m pytest -q -m gpu tests/test_backend_mlc_llm.py  # compiles and serves a tiny model
    build_and_validate mlc-llm "$MLC/bin/amoeba-profile" "$MLC/bin/python" "${GRID[@]}" \
        ${WHOLE_UNIFORM_HEADS:+--whole "$WHOLE_UNIFORM_HEADS"}
else
    record mlc-llm "install failed (nvcc on PATH? mlc-llm-nightly-$MLC_CUDA wheels for this CUDA?); skipped"
fi

if [ "${BENCH:-0}" = 1 ]; then
    # Both methods against generate() truth (components vs difference, uniform and per-layer subnets).
    "$PT/bin/python" benchmarks/composition_error.py --model "$MODEL" --device cuda --contexts 128,512 \
        --decode-steps 32 --out "$OUT/bench" --json "$OUT/bench/composition-$MODEL.json"
fi
write_archive  # one tar.gz: tables, raw outputs, cross-checks, pip freeze, nvidia-smi -q
summary
