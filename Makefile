# Two entry points: `make demo` (set up + the main job on CPU) and `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/lut
BUDGET ?= 180

.PHONY: setup demo test lint typecheck bench clean

# torch is pinned first: on the package index this project's machines use, 2.13.0 resolves to a CPU wheel;
# on a stock Linux index a plain torch (pinned or not) is the multi-GB CUDA build (README, Install).
# The onnxruntime and fleet extras are installed so that `make test` (CI) runs that backend's tests and the
# fleet's Ray tests for real.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,llama-cpp,onnxruntime,fleet]"
	touch $(STAMP)

setup: $(STAMP)

# The demo shows and selects the table its build printed (`table: PATH`), not whatever $(OUT) holds:
# other tables there (README's --predict example writes one) would make `--lut $(OUT)` ambiguous.
demo: setup
	@exec 3>&1; \
	table=$$($(BIN)/amoeba-profile build-lut --model tinyllama-1.1b --out $(OUT) | tee /dev/fd/3 \
	         | sed -n 's/  (.*//; s/^table: //p'); \
	test -n "$$table" || { echo "make demo: build-lut printed no 'table:' line" >&2; exit 1; }; \
	set -x; \
	$(BIN)/amoeba-profile show --lut "$$table" && \
	$(BIN)/amoeba-profile select --lut "$$table" --metric tpot --budget-ms $(BUDGET)

test: setup lint typecheck
	$(BIN)/python -m pytest -q

# ruff (lint + format) over the code, tests and benchmarks; the import rules are a test (tests/test_import_rules.py).
lint: setup
	$(BIN)/ruff check amoeba_profile backends tests benchmarks
	$(BIN)/ruff format --check amoeba_profile backends tests benchmarks

# mypy sees the flows where Python imports them: backends/ is installed as amoeba_profile.backends
# (package-dir), which a checker reading folders cannot follow, so it reads a tree of links that
# places backends/ inside the package.
typecheck: setup
	rm -rf .typecheck && mkdir -p .typecheck/amoeba_profile
	for entry in amoeba_profile/*; do ln -s "$$PWD/$$entry" .typecheck/amoeba_profile/; done
	ln -s "$$PWD/backends" .typecheck/amoeba_profile/backends
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p amoeba_profile

bench: setup
	cd benchmarks && ../$(BIN)/python method_accuracy.py

clean:
	rm -rf $(VENV) out .typecheck
