#!/usr/bin/env bash
# Build llama.cpp's llama-bench (and llama-batched-bench, the cross-check's tool at batch > 1) for the
# llama.cpp backend: CPU only, this machine's ISA
# (GGML_NATIVE), Release, statically linked so the binary can be copied out of the build tree.
#
# There is no prebuilt CPU llama.cpp on PyPI or in Debian 12, so the source comes from the
# llama-cpp-python sdist on PyPI, which vendors a pinned llama.cpp commit (its CHANGELOG names it);
# the sdist's sha256 is checked. Only the llama-bench and llama-batched-bench targets are built (ggml,
# llama, common and the two tools), not the Python bindings, the server or the other tools.
#
# Idempotent: a finished binary in the cache is reused. The last line printed is the export to run:
#   export AMOEBA_LLAMA_CPP=<cache>/bin/llama-bench
#
# Environment: PYTHON (a python with pip; default python3), JOBS (parallel compile jobs; default 2),
# AMOEBA_LLAMA_CPP_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/amoeba-profile/llama.cpp).
set -euo pipefail

SDIST_VERSION=0.3.36                # llama-cpp-python release whose vendor/llama.cpp is built
LLAMA_COMMIT=0c1e57098              # ggml-org/llama.cpp commit vendored by that release (its CHANGELOG)
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
ROOT=${AMOEBA_LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/amoeba-profile/llama.cpp}
CACHE="$ROOT/$LLAMA_COMMIT"
BIN="$CACHE/bin/llama-bench"

if [[ -x "$BIN" && -x "$CACHE/bin/llama-batched-bench" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "llama-bench already built: $BIN" >&2
    echo "export AMOEBA_LLAMA_CPP=$BIN"
    exit 0
fi

for tool in cmake ninja "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "build-llama-cpp: '$tool' not found (apt-get install cmake ninja-build g++)" >&2; exit 1; }
done

mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$SDIST_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    download=$(mktemp -d "$CACHE/.download.XXXXXX")
    trap 'rm -rf "$download"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$download"
    mv "$download/llama_cpp_python-$SDIST_VERSION.tar.gz" "$SDIST"
fi
echo "$SDIST_SHA256  $SDIST" | sha256sum --check --quiet - || { echo "build-llama-cpp: $SDIST has another sha256; delete it and rerun" >&2; exit 1; }

SRC="$CACHE/src/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    rm -rf "$CACHE/src"
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src" "llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
    rm -f "$SRC/.git"  # a submodule link to a repository the sdist lacks; the commit is passed below
fi

start=$(date +%s)
cmake -S "$SRC" -B "$CACHE/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT" -DLLAMA_BUILD_NUMBER=0 \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF >"$CACHE/configure.log"
cmake --build "$CACHE/build" --target llama-bench llama-batched-bench -j "$JOBS" >"$CACHE/build.log"
mkdir -p "$CACHE/bin"
cp "$CACHE/build/bin/llama-batched-bench" "$CACHE/bin/llama-batched-bench.tmp"
mv "$CACHE/bin/llama-batched-bench.tmp" "$CACHE/bin/llama-batched-bench"
cp "$CACHE/build/bin/llama-bench" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
echo "built in $(( $(date +%s) - start )) s (log: $CACHE/build.log)" >&2
echo "export AMOEBA_LLAMA_CPP=$BIN"
