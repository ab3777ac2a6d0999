# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
BASE := $(VENV)/.moescope-base
DEV := $(VENV)/.moescope-dev
# the CPU build of torch on this machine's disk (a plain `torch` would pull a multi-GB CUDA build)
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

# llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores), once per venv; pip caches the wheel
$(DEV): $(BASE)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e '.[dev,hf,llama,place,dask]' '$(TORCH)'
	touch $@

demo: $(BASE)
	$(VENV)/bin/moescope demo --out demo-out

test: $(DEV)
	$(VENV)/bin/ruff check src tests bench tools
	$(PY) -m pytest -q
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q -m kernels

lint: $(DEV)
	$(VENV)/bin/ruff check src tests bench tools

bench: $(DEV)
	$(PY) bench/run.py --out bench/results

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
