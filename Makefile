# Everything set-up lives here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
OUT ?= runs/demo

.PHONY: install install-dev demo test test-fast lint typecheck browser bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the pinned CPU wheel, so nothing later resolves a CUDA build.
install: $(PY)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[demo,train]"

install-dev: $(PY)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"

demo: install
	$(VENV)/bin/abliterate run --model demo --out $(OUT) --overwrite

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: install-dev
	$(PY) -m mypy

# Headless Chromium lets the tests render report.html. It is installed only where that can
# work (root, with apt-get); elsewhere the browser test skips, and this step never fails.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the HTML report test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core; } >/dev/null 2>&1 \
	  || echo "could not install chromium; the browser test will skip"; \
	else echo "chromium not found (install it to run the browser test); it will skip"; fi

# Everything, as CI runs it (the slow end-to-end tests on the real demo model included).
test: install-dev lint typecheck browser
	$(PY) -m pytest

# The development loop: the same gate without the slow demo-model tests.
test-fast: install-dev lint typecheck
	$(PY) -m pytest -m "not slow"

bench: install-dev
	$(PY) benchmarks/stages.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
