# Two entry points: `make demo` (set up + the main job on CPU) and `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/lut
BUDGET ?= 180

.PHONY: setup demo test bench clean

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

demo: setup
	$(BIN)/amoeba-profile build-lut --model tinyllama-1.1b --out $(OUT)
	$(BIN)/amoeba-profile show --lut $(OUT)
	$(BIN)/amoeba-profile select --lut $(OUT) --metric tpot --budget-ms $(BUDGET)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/composition_error.py

clean:
	rm -rf $(VENV) out
