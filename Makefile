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
	$(PY) -m pip install -q -e ".[test,export]"
	$(PY) -m pip download -q --no-deps timm==1.0.31 -d .whl/timm  # tests/test_export.py loads its auto_augment.py alone
	touch $@

.PHONY: demo test bench device-wheels
demo: $(VENV)/.installed
	$(PY) -m diffaug demo --out demo.png

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist worksteal -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_fidelity.py

# kornia's wheels for the lent GPU machine (Python 3.12, x86-64, torch but no kornia, no package index), into .whl/
# for benchmarks/device_check.sh; the versions this project's own installs resolve to.
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl kornia==0.9.0 kornia_rs==0.2.0
