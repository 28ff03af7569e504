# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv if needed, trains the embedded default, writes outputs/runs/<date>/<time>/
#   make test   -> creates .venv if needed, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench bench-smoke clean

venv: $(STAMP)

# torch first: `pip install torch==2.13.0` takes the CPU wheel (a plain `torch` requirement would pull a CUDA
# build of several GB). Then the project with the full lock as constraints. scimilarity itself is installed
# without its dependencies (it pins zarr<3, which anndata 0.12 cannot share); the compatibility test loads only
# its dependency-free nn_models.py.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps scimilarity==0.4.1
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py

test: $(STAMP)
	$(PY) -m pytest

# every benchmark at its documented size (hours; results in benchmarks/results/), or at tiny sizes (minutes; checks
# each writes the JSON keys the docs read; also part of `make test`)
bench: $(STAMP)
	$(PY) benchmarks/suite.py

bench-smoke: $(STAMP)
	$(PY) -m pytest -m bench_smoke tests/test_benchmarks.py

clean:
	rm -rf outputs .pytest_cache
