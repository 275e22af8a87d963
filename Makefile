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

# numba caches each kernel by its own file's time stamp, not by those of the files it inlines
# (kernels/_pool.py, _stream.py, _intrinsics.py, _formulas.py, ...): this stamp clears the
# cache whenever one of them changed, so no stale kernel is ever tested or measured.
KERNEL_CACHE := $(VENV)/.kernel-cache
$(KERNEL_CACHE): $(wildcard src/normgrad/kernels/*.py) src/normgrad/_formulas.py | $(STAMP)
	find src -name '*.nb[ic]' -delete
	touch $@

# The dask memory-bound tests count evictions: next to the kernel tests on the other core they
# failed now and then (scheduling under contention), so they run alone, after the rest.
pytest: $(STAMP) $(KERNEL_CACHE)
	$(VENV)/bin/pytest -q -n 2 -m "not serial"
	$(VENV)/bin/pytest -q -m serial

bench: $(STAMP) $(KERNEL_CACHE)
	$(PY) benchmarks/run.py

# numba's cache (src/normgrad/kernels/__pycache__/*.nbi, *.nbc), by hand.
clean-cache:
	find src -name '*.nb[ic]' -delete

clean: clean-cache
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
