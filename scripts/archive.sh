#!/usr/bin/env bash
# One archive of what a device run produced, to contribute (README, "Contributing results"):
#   tables/      OUT/SLUG as the run left it: every table's CSV and .meta.json sidecar (with its
#                cross-checks), device.json
#   raw/         the libraries' raw outputs of the first run ($AMOEBA_RAW_DIR: llama-bench JSON,
#                TensorRT-LLM perf metrics, MLC-LLM usage), when the run kept any
#   crosscheck/  `amoeba-profile crosscheck --json` of each table, rerun by the device script
#   env/         `pip freeze` of every flow's environment, and the device state: `nvidia-smi -q`, or on
#                a Jetson the board model, L4T release, `nvpmodel -q` and `jetson_clocks --show`
#   MANIFEST.sha256, archive.json   a checksum per file; when, where and how it was made
#
# Usage: scripts/archive.sh [--dry-run] ARCHIVE.tar.gz OUT SLUG [NAME=PYTHON ...]
#   NAME=PYTHON: a flow's environment (a python, or a `docker run ...` prefix) whose pip freeze to keep.
# --dry-run: the CPU-runnable part, for trying the archive anywhere - device tools that are absent
# (nvidia-smi, nvpmodel) are noted in env/ instead of failing the archive. Without it, a missing
# device tool is an error: an archive from a device must say the device's state.
set -euo pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 3 ]]; then
    echo "usage: scripts/archive.sh [--dry-run] ARCHIVE.tar.gz OUT SLUG [NAME=PYTHON ...]" >&2
    exit 2
fi
ARCHIVE=$1 OUT=$2 SLUG=$3
shift 3
[[ $ARCHIVE == *.tar.gz ]] || { echo "archive.sh: $ARCHIVE: the archive's name must end in .tar.gz" >&2; exit 2; }
[[ -d $OUT/$SLUG ]] || { echo "archive.sh: no folder $OUT/$SLUG (run the device script first)" >&2; exit 2; }

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/amoeba-profile-$SLUG"
mkdir -p "$ROOT/tables" "$ROOT/env" "$ROOT/crosscheck" "$ROOT/raw"

# Tables: CSV, sidecars and device.json only; journals, locks and raw/ are not tables.
(cd "$OUT/$SLUG" && find . -type f \( -name '*.csv' -o -name '*.meta.json' -o -name 'device.json' \) -print0) |
    while IFS= read -r -d '' file; do
        mkdir -p "$ROOT/tables/$(dirname "$file")"
        cp "$OUT/$SLUG/$file" "$ROOT/tables/$file"
    done
[[ -d $OUT/$SLUG/raw ]] && cp -R "$OUT/$SLUG/raw/." "$ROOT/raw/"
[[ -d $OUT/$SLUG/crosscheck ]] && cp -R "$OUT/$SLUG/crosscheck/." "$ROOT/crosscheck/"

note_missing() {  # FILE TOOL: a device tool that is not here
    if [[ $DRY_RUN == 1 ]]; then
        echo "not recorded: $2 is not available on $(hostname) (dry run)" > "$ROOT/env/$1"
    else
        echo "archive.sh: $2 not found; an archive from a device needs it (--dry-run to try the archive without)" >&2
        exit 1
    fi
}

for pair in "$@"; do
    name=${pair%%=*} python=${pair#*=}
    $python -m pip freeze > "$ROOT/env/pip-freeze-$name.txt" 2>&1 || echo "pip freeze failed ($python)" >> "$ROOT/env/pip-freeze-$name.txt"
done

if [[ -f /etc/nv_tegra_release ]]; then  # a Jetson: the board, its power mode and clocks
    { tr -d '\0' < /proc/device-tree/model; echo; head -1 /etc/nv_tegra_release; } > "$ROOT/env/jetson-board.txt"
    if command -v nvpmodel >/dev/null; then
        sudo -n nvpmodel -q > "$ROOT/env/nvpmodel-q.txt" 2>&1 || nvpmodel -q > "$ROOT/env/nvpmodel-q.txt" 2>&1 || true
    else
        note_missing nvpmodel-q.txt nvpmodel
    fi
    if command -v jetson_clocks >/dev/null; then
        sudo -n jetson_clocks --show > "$ROOT/env/jetson-clocks.txt" 2>&1 || true
    else
        note_missing jetson-clocks.txt jetson_clocks
    fi
elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -q > "$ROOT/env/nvidia-smi-q.txt" 2>&1
else
    note_missing nvidia-smi-q.txt nvidia-smi
fi
uname -a > "$ROOT/env/uname.txt"

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -c . || true)
cat > "$ROOT/archive.json" <<JSON
{"slug": "$SLUG", "created_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "host": "$(hostname)",
 "amoeba_profile_commit": "$commit", "uncommitted_changes": $dirty, "dry_run": $([[ $DRY_RUN == 1 ]] && echo true || echo false)}
JSON
(cd "$ROOT" && find . -type f ! -name MANIFEST.sha256 -print0 | sort -z | xargs -0 sha256sum > MANIFEST.sha256)
mkdir -p "$(dirname "$ARCHIVE")"
tar -czf "$ARCHIVE.tmp" -C "$STAGE" "amoeba-profile-$SLUG"
mv "$ARCHIVE.tmp" "$ARCHIVE"
echo "archive: $ARCHIVE ($(tar -tzf "$ARCHIVE" | grep -vc '/$') files)"
