# `make demo` and `make test` set everything up on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean clean-cache

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU build that lies on this machine's disk.
	$(PY) -m pip install -q -e '.[test]' 'torch==2.13.0'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m normgrad demo

test: lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy src/normgrad

# The dask memory-bound tests count evictions: next to the kernel tests on the other core they
# failed now and then (scheduling under contention), so they run alone, after the rest.
pytest: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 -m "not serial"
	$(VENV)/bin/pytest -q -m serial

bench: $(STAMP)
	$(PY) benchmarks/run.py

# numba's cache (src/normgrad/kernels/__pycache__/*.nbi, *.nbc), by hand (normgrad.kernels
# drops it by itself whenever a kernel file changed).
clean-cache:
	find src -name '*.nb[ic]' -delete

clean: clean-cache
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
