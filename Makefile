# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moescope-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moescope demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py --out bench/results

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
