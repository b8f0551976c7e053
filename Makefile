# The two entry points of the README. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 is the CPU build that lies on these machines' disk; an unpinned torch pulls CUDA
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check nestc tests benchmarks examples
	# one thread per worker: two workers of two threads each on two cores spent most of their
	# time waiting on each other (tests/test_module.py: 114 s, against 15 s)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: $(STAMP)
	$(PY) -m ruff check nestc tests benchmarks examples
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/optim.py

clean:
	rm -rf $(VENV) out
