# moeopt: `make demo` sets everything up and runs the main job; `make test` sets everything up and runs the checks.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "moeopt needs Python 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an open range pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moeopt demo

lint: $(STAMP)
	$(BIN)/ruff check moeopt tests $(wildcard scripts bench)

typecheck: $(STAMP)
	$(BIN)/mypy moeopt

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=10 tests

test: lint typecheck unit

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache

# ARM64 check, not in CI (minutes under emulation): scripts/run_artifact.py --parity with PyPI's aarch64
# onnxruntime in an arm64 Debian root (debootstrap) run through qemu-user-static. See README "ARM64 check".
.PHONY: test-arm64
test-arm64: $(STAMP)
	bash scripts/arm64/test.sh
