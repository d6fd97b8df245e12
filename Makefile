# Everything set-up lives here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
OUT ?= runs/demo

.PHONY: install install-dev demo test lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the pinned CPU wheel, so nothing later resolves a CUDA build.
install: $(PY)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[demo]"

install-dev: $(PY)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"

demo: install
	$(VENV)/bin/abliterate run --model demo --out $(OUT) --overwrite

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: install-dev
	$(PY) -m mypy

test: install-dev lint typecheck
	$(PY) -m pytest

bench: install-dev
	$(PY) benchmarks/stages.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
