#!/usr/bin/env bash
# Measured tables on a Jetson Orin NX (JetPack 6.x, L4T r36) for three deployment flows - eager
# PyTorch, TensorRT-LLM and MLC-LLM - each validated against whole-model truth, under OUT/<slug>/.
#
# The Orin NX's 8/16 GB are shared by CPU and GPU: llama2-7b fp16 (13.5 GB of weights) does not fit
# whole next to the OS, and every flow here measures whole models, so the default model is
# tinyllama-1.1b. PyTorch runs in a host venv (NVIDIA's JetPack build of torch); TensorRT-LLM and
# MLC-LLM run in jetson-containers images (docker with the nvidia runtime, usable without sudo;
# ~8 GB each to pull),
# with this checkout mounted at the same path (a path without spaces). A flow that fails to
# install, build or validate is reported and skipped; the summary at the end says what each made.
# The run ends by writing one archive to contribute (scripts/archive.sh).
# Usage: scripts/jetson-orin-nx.sh [MODEL] [OUT]
# Environment: MLC_IMAGE, TRTLLM_IMAGE override the images below.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device-tables.sh
MODEL=${1:-tinyllama-1.1b}
OUT=${2:-lut}
VENV=${VENV:-.venv-jetson}
MLC_IMAGE=${MLC_IMAGE:-dustynv/mlc:0.20.0-r36.4.0}
TRTLLM_IMAGE=${TRTLLM_IMAGE:-dustynv/tensorrt_llm:0.12-r36.4.0}
GRID=(--prompt-len 128 --contexts 128,256,512)
whole_subnets "$MODEL"  # WHOLE (any flow) and WHOLE_UNIFORM_HEADS (mlc-llm) validation rows
# One measurement lock folder for the host and the containers, so two flows never measure at once.
export AMOEBA_LOCK_DIR=/tmp/amoeba-profile-locks
mkdir -p "$AMOEBA_LOCK_DIR" "$HOME/.cache/amoeba-profile"

cat /proc/device-tree/model; echo
head -1 /etc/nv_tegra_release
# Maximum power mode and locked clocks make tables repeatable (both need root and persist until reboot).
sudo nvpmodel -m 0
sudo nvpmodel -q
sudo jetson_clocks

# pytorch (eager) on the host: PyPI's aarch64 torch wheels have no CUDA for Jetson, so install
# NVIDIA's JetPack build first, e.g.
#   pip install torch --index-url https://pypi.jetson-ai-lab.io/jp6/cu126
# (pick the index matching your JetPack); the venv sees it through --system-site-packages.
python3 -m venv --system-site-packages "$VENV"
if "$VENV/bin/python" -c 'import torch; assert torch.cuda.is_available()' &&
        "$VENV/bin/python" -m pip install --quiet --no-deps -e . &&
        "$VENV/bin/python" -m pip install --quiet "transformers>=5,<6" numpy pandas typer rich filelock scipy \
            matplotlib pytest hypothesis; then
    SLUG=$("$VENV/bin/python" -c 'from amoeba_profile.device import device_slug; print(device_slug("cuda"))') || exit 1
    "$VENV/bin/amoeba-profile" profile-device --device cuda --out "$OUT"  # OUT/<slug>/device.json
    keep_raw_outputs  # the libraries' raw outputs of this first run: OUT/<slug>/raw (mounted in the containers)
    ARCHIVE_ENVS+=("pytorch=$VENV/bin/python")
    "$VENV/bin/python" -m pytest -q -m gpu  # CUDA-event timing on a tiny model (other flows skip here)
    build_and_validate pytorch "$VENV/bin/amoeba-profile" "$VENV/bin/python" "${GRID[@]}" ${WHOLE:+--whole "$WHOLE"}
else
    echo "no JetPack CUDA build of torch in $VENV (see above): no device slug, nothing else can run" >&2
    exit 1
fi

# IMAGE with this project installed (without touching the image's numpy and torch), committed as
# amoeba-profile/FLOW:local; prints that tag.
project_image() {  # FLOW IMAGE
    local tag="amoeba-profile/$1:local" setup="amoeba-setup-$1"
    docker pull "$2" >&2 || return 1
    docker rm -f "$setup" >/dev/null 2>&1
    docker run --name "$setup" -v "$PWD:/src:ro" "$2" bash -c '
        python3 -m pip freeze | grep -iE "^(numpy|torch|tensorrt.*)==" > /tmp/keep.txt
        cp -r /src /tmp/amoeba-profile && rm -rf /tmp/amoeba-profile/.venv*
        python3 -m pip install --quiet --no-deps /tmp/amoeba-profile &&
        python3 -m pip install --quiet -c /tmp/keep.txt pandas typer rich filelock scipy matplotlib \
            pytest hypothesis' >&2 &&
        docker commit "$setup" "$tag" >/dev/null && docker rm "$setup" >/dev/null && echo "$tag"
}

# docker run prefix of a flow's container: GPU, this checkout at its own path, the shared lock
# folder and a persistent compiled-engine cache.
in_container() {  # TAG [-i]
    echo "docker run --rm ${2:-} --runtime nvidia --network host -v $PWD:$PWD -w $PWD" \
         "-v $AMOEBA_LOCK_DIR:$AMOEBA_LOCK_DIR -e AMOEBA_LOCK_DIR=$AMOEBA_LOCK_DIR" \
         "-v $AMOEBA_RAW_DIR:$AMOEBA_RAW_DIR -e AMOEBA_RAW_DIR=$AMOEBA_RAW_DIR" \
         "-v $HOME/.cache/amoeba-profile:/root/.cache/amoeba-profile $1"
}

if TAG=$(project_image tensorrt-llm "$TRTLLM_IMAGE"); then
    ARCHIVE_ENVS+=("tensorrt-llm=$(in_container "$TAG" -i) python3")
    build_and_validate tensorrt-llm "$(in_container "$TAG") amoeba-profile" "$(in_container "$TAG" -i) python3" \
        "${GRID[@]}" ${WHOLE:+--whole "$WHOLE"}
else
    record tensorrt-llm "install failed (docker pull $TRTLLM_IMAGE or installing the project into it); skipped"
fi

# MLC-LLM: uniform shapes whose head count divides hidden_size only (MLC's LlamaModel asserts it),
# so TinyLlama's widths 3/4 and 5/8 (24 heads) are `unsupported` rows and its whole rows prune depth.
if TAG=$(project_image mlc-llm "$MLC_IMAGE"); then
    ARCHIVE_ENVS+=("mlc-llm=$(in_container "$TAG" -i) python3")
    # A tiny model end to end; the pytest script (not python -m) keeps the checkout off sys.path.
    $(in_container "$TAG") pytest -q -p no:cacheprovider -m gpu tests/test_backend_mlc_llm.py
    build_and_validate mlc-llm "$(in_container "$TAG") amoeba-profile" "$(in_container "$TAG" -i) python3" \
        "${GRID[@]}" ${WHOLE_UNIFORM_HEADS:+--whole "$WHOLE_UNIFORM_HEADS"}
else
    record mlc-llm "install failed (docker pull $MLC_IMAGE or installing the project into it); skipped"
fi

sudo chown -R "$(id -u):$(id -g)" "$OUT"  # the containers wrote as root
write_archive  # one tar.gz: tables, raw outputs, cross-checks, pip freeze, nvpmodel and clock state
summary
