# Two commands a new user needs: `make demo` and `make test`. Both set up .venv first (once).
# torch 2.13.0 is installed before the project so that pip keeps it (a CPU build on the project's machines)
# instead of resolving a multi-GB CUDA build; set TORCH=torch to take whatever your platform prefers.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(PY) -m diffaug demo --out demo.png

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_fidelity.py
