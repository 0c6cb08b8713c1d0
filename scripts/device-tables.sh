# Shared steps of the device scripts (a5000.sh, jetson-orin-nx.sh); sourced, not run.
#
# A flow is installed, built and validated on its own: one that fails is recorded and the next
# flow goes on. `summary` prints one line per flow and exits non-zero only if no table was built.

declare -A FLOW_STATUS=()
FLOW_ORDER=()

record() {  # FLOW STATUS...
    FLOW_ORDER+=("$1")
    FLOW_STATUS[$1]="${*:2}"
    echo "== $1: ${*:2}"
}

# Whole subnets measured as validation rows in every table: WHOLE for flows that take any width,
# WHOLE_UNIFORM_HEADS for mlc-llm, whose head count must divide hidden_size (full heads only on
# llama2-7b and TinyLlama). Empty for another model.
whole_subnets() {  # MODEL
    case $1 in
        llama2-7b) WHOLE=32x1,28x7/8,24x3/4,20x5/8 WHOLE_UNIFORM_HEADS=32x1,28x1,24x1 ;;
        tinyllama-1.1b) WHOLE=22x1,16x3/4 WHOLE_UNIFORM_HEADS=22x1,16x1 ;;
        *) WHOLE="" WHOLE_UNIFORM_HEADS="" ;;
    esac
}

# 80 % of the full model's predicted tpot (prompt 128, 128 new tokens) in TABLE: a budget the picks
# must prune to fit, so validation measures pruned shapes. Runs with the PYTHON that built TABLE
# (a path, or a `docker run ...` prefix); -I keeps the checkout's own amoeba_profile/ folder, which
# lacks the backends mapped in by the install, off sys.path.
table_budget() {  # "PYTHON" TABLE
    $1 -I - "$2" <<'PY'
import sys
import amoeba_profile as ap

table = ap.load_table(sys.argv[1])
arch = ap.ModelArch.from_dict(table.meta["arch"])
full = ap.Predictor(table).predict(ap.Subnet.uniform(arch, arch.num_layers, 1.0), ap.Workload(prompt_len=128, gen_len=128))
print(f"{0.8 * full.metric('tpot'):.3f}")
PY
}

# A shipped roofline table where the measured one goes (lut/rtx-a5000/tensorrt-llm/llama2-7b-*)
# would make build-lut refuse the path: move it, with its sidecar, into a roofline/ folder beside.
set_roofline_aside() {  # TABLE
    local table=$1 sidecar=${1%.csv}.meta.json aside
    aside="$(dirname "$1")/roofline"
    if [ -f "$sidecar" ] && grep -q '^  "source": "roofline"' "$sidecar"; then
        mkdir -p "$aside" && mv "$table" "$sidecar" "$aside/" &&
            echo "moved the roofline table $table to $aside/: the measured table takes its path"
    fi
}

# The flows' environments whose pip freeze goes into the archive (NAME=PYTHON), added as each installs.
ARCHIVE_ENVS=()

# The libraries' raw outputs of this run (first samples of each kind) go to OUT/SLUG/raw, an absolute
# path so the containers of jetson-orin-nx.sh write to the same place (backends/base.py save_raw).
keep_raw_outputs() {  # after OUT/SLUG exists
    AMOEBA_RAW_DIR="$(cd "$OUT/$SLUG" && pwd)/raw"
    export AMOEBA_RAW_DIR
    mkdir -p "$AMOEBA_RAW_DIR" "$OUT/$SLUG/crosscheck"
}

# The table's full-model prediction against the flow's own benchmark tool (amoeba-profile
# crosscheck): stored in the sidecar and, as JSON, in OUT/SLUG/crosscheck/ for the archive.
crosscheck_table() {  # FLOW "AMOEBA" TABLE
    local result="$OUT/$SLUG/crosscheck/$1-$MODEL.json"
    if $2 crosscheck --lut "$3" --json > "$result.tmp"; then
        mv "$result.tmp" "$result"
        echo "cross-check of $1 written to $result"
    else
        rm -f "$result.tmp"
        echo "cross-check of $1 failed (see above); the table is kept"
    fi
}

# The archive to contribute (scripts/archive.sh): tables, raw outputs, cross-checks, pip freeze of
# every flow's environment, the device state.
write_archive() {
    local archive="$OUT/amoeba-profile-$SLUG-$(date -u +%Y%m%dT%H%M%SZ).tar.gz"
    if scripts/archive.sh "$archive" "$OUT" "$SLUG" "${ARCHIVE_ENVS[@]}"; then
        echo "To contribute: attach $archive to a pull request (README, 'Contributing results')."
    else
        echo "writing the archive failed (see above); the tables are under $OUT/$SLUG/"
    fi
}

# build-lut for FLOW, then validate its top-3 picks against whole-model truth; records the outcome.
# AMOEBA is the amoeba-profile command (a venv's, or a `docker run ...` prefix), PYTHON its python.
build_and_validate() {  # FLOW "AMOEBA" "PYTHON" BUILD-OPTIONS...
    local flow=$1 amoeba=$2 python=$3 table budget
    shift 3
    table="$OUT/$SLUG/$flow/$MODEL-float16.csv"
    set_roofline_aside "$table"
    if ! $amoeba build-lut --backend "$flow" --device cuda --dtype float16 --model "$MODEL" --out "$OUT" "$@"; then
        record "$flow" "build failed (see above); skipped"
        return
    fi
    $amoeba show --lut "$table" | head -n 40
    crosscheck_table "$flow" "$amoeba" "$table"
    if ! budget=$(table_budget "$python" "$table"); then
        record "$flow" "table $table built; no budget (its full model is not covered), not validated"
        return
    fi
    echo "validating $flow at a tpot budget of $budget ms (80 % of the full model)"
    if $amoeba validate --lut "$table" --budget-ms "$budget" --top-k 3; then
        record "$flow" "table $table built and validated (picks measured whole, rows written back)"
    else
        record "$flow" "table $table built; validation exited $? (a pick broke the budget, or see above)"
    fi
}

summary() {
    local flow built=0
    echo
    echo "Summary for $MODEL on $SLUG (tables under $OUT/$SLUG/):"
    for flow in "${FLOW_ORDER[@]}"; do
        echo "  $flow: ${FLOW_STATUS[$flow]}"
        [[ ${FLOW_STATUS[$flow]} == table* ]] && built=$((built + 1))
    done
    [ "$built" -gt 0 ]
}
