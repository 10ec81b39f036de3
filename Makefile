# `make test` and `make demo` work on a fresh machine: they create .venv when missing,
# install torch 2.13.0 first (a bare `torch` requirement can pull a multi-GB CUDA build),
# then the project in editable mode with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo venv bench-venv bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,demo]"
	@touch $(STAMP)

venv: $(STAMP)

# ruff and mypy (configured in pyproject.toml) on the library packages, then the whole suite.
LIBRARY := dht averaging verification swarm

lint: $(STAMP)
	$(PY) -m ruff check $(LIBRARY)
	$(PY) -m mypy $(LIBRARY)

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m swarm demo --peers 4 --out demo-output

# hivemind 1.1.12 in its own virtualenv, for side-by-side benchmarks only.
bench-venv:
	bash benchmarks/bench_venv.sh

bench: $(STAMP)
	$(PY) benchmarks/transport.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
