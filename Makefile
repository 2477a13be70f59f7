# make demo / make test: each creates .venv when missing and installs what it needs.
# torch is installed first, pinned: a bare `pip install torch` would pull a multi-GB CUDA build.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.crossent-installed

.PHONY: demo test bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo,bench]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crossent demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

bench-quick: $(STAMP)
	$(VENV)/bin/crossent bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
