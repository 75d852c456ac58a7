# moeopt: `make demo` sets everything up and runs the main job; `make test` sets everything up and runs the checks.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit clean

# The development environment: the compiler (the `compile` extra) and the test tools. A device needs only
# `pip install moeopt` (the runtime; Python 3.10-3.12), which `make test-runtime` checks.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "moeopt's compiler needs Python 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an open range pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[compile,test]'
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

# The runtime-only install (no extras, no torch) in a fresh venv per interpreter, running the committed tiny
# artifacts (scripts/runtime_install.py; `make test` runs it for this Python). pyenv's 3.10, 3.11 and 3.12
# when installed, else python3.X on PATH.
PYENV_ROOT ?= $(HOME)/.pyenv
runtime_python = $(firstword $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python$(1)) python$(1))
RUNTIME_PYTHONS ?= $(foreach v,3.10 3.11 3.12,$(call runtime_python,$(v)))

.PHONY: test-runtime
test-runtime: $(STAMP)
	$(BIN)/python scripts/runtime_install.py $(foreach p,$(RUNTIME_PYTHONS),--python $(p))

# ARM64 check, not in CI (minutes under emulation): the runtime-only install (moeopt's wheel and its base
# dependencies' aarch64 wheels from PyPI) in an arm64 Debian root (debootstrap) run through qemu-user-static:
# scripts/run_artifact.py --parity on the reference model's artifacts, then `moeopt run` / `moeopt eval` on
# the committed tiny artifacts without torch. See README "ARM64 check".
.PHONY: test-arm64
test-arm64: $(STAMP)
	bash scripts/arm64/test.sh
