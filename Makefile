# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.staralign-installed

.PHONY: setup test test-fast demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first, pinned to the CPU build on local disk, only when no
# torch is present: any other spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow (CI and `make test` run those too).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check staralign tests

demo: $(STAMP)
	$(BIN)/staralign demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info
