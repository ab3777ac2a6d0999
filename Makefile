# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
BASE := $(VENV)/.moescope-base
DEV := $(VENV)/.moescope-dev
# the CPU build of torch on this machine's disk (a plain `torch` would pull a multi-GB CUDA build)
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench fuzz clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

# llama-cpp-python compiles llama.cpp: about 5 minutes on 2 cores, the longest step of a fresh `make test`.
# pip keeps the built wheel in its cache, so later venvs on this machine install it in seconds.
$(DEV): $(BASE)
	@echo "installing the dev extras; llama-cpp-python compiles llama.cpp unless pip has its wheel cached (about 5 min on 2 cores)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e '.[dev,hf,llama,place,dask]' '$(TORCH)'
	touch $@

demo: $(BASE)
	$(VENV)/bin/moescope demo --out demo-out

# the first run also builds the model zoo (tests/zoo.py: 13 models converted with llama.cpp's converter, about
# 2 minutes), cached in ~/.cache/moescope/zoo for later runs; --durations lists what took longest
test: $(DEV)
	$(VENV)/bin/ruff check src tests bench tools
	$(PY) -m pytest -q --durations=8
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q -m kernels

lint: $(DEV)
	$(VENV)/bin/ruff check src tests bench tools

bench: $(DEV)
	$(PY) bench/run.py --out bench/results

# the fuzz suite's long tier (the fast tier runs in `make test`): 2,400 mutated inputs and hostile arguments
# through the CLI, each in a child with a memory cap and a time limit; a table per format, exit 1 on a finding
fuzz: $(DEV)
	$(PY) tools/fuzz.py --cases 2400 --seed 1 --out fuzz-results.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache fuzz-results.json
