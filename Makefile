# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-scale clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip wheel setuptools

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# two pytest workers (pytest-xdist), whole files per worker so module fixtures run once; every
# test pins torch / OpenMP to one thread, so two workers fill a 2-core machine without fighting
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
	  $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-output

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python examples/bench.py --out docs/benchmarks.md

# issue 15: N in {10k, 50k, 150k} x K in {27, 1000, 5600}, time and peak RSS of train / stack /
# predict (each in its own pinned child process); not part of `make test` or `make bench`
bench-scale: $(STAMP)
	$(BIN)/python examples/bench_scale.py --json docs/bench_scale.json --plot docs/bench_scale.png

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
