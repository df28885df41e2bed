# Quick start:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-torch lint docs check bench bench-quick mutate clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.done

demo: setup
	$(VENV)/bin/deferinit demo

# Runs the whole suite: src doctests and tests/, measuring line coverage of the
# deferinit package; fails under 90%. Exit code 5 (no tests ran) fails.
test: setup
	$(PY) -m pytest src tests --cov=deferinit --cov-report=term-missing:skip-covered --cov-fail-under=90

# The same suite on another torch release, in a venv of its own (.venv-torch-VERSION):
#   make test-torch TORCH_VERSION=2.14.0
# Installs that torch first, then this package with its dev extra, checks the venv holds
# that release, and runs `make test` there. Results: docs/torch-versions.md.
TORCH_VERSION ?=
TORCH_VENV     = .venv-torch-$(TORCH_VERSION)

test-torch:
	@if [ -z "$(TORCH_VERSION)" ]; then \
		echo "make test-torch: which torch? e.g. make test-torch TORCH_VERSION=2.14.0" >&2; exit 2; fi
	$(MAKE) --no-print-directory setup VENV=$(TORCH_VENV) TORCH="torch==$(TORCH_VERSION)"
	$(TORCH_VENV)/bin/python -c "import sys, torch; v, want = torch.__version__.split('+')[0], \
		'$(TORCH_VERSION)'.split('+')[0]; sys.exit(None if v in (want, want + '.0') else \
		f'make test-torch: $(TORCH_VENV) holds torch {torch.__version__}, not $(TORCH_VERSION)')"
	COVERAGE_FILE=$(TORCH_VENV)/.coverage $(MAKE) --no-print-directory test VENV=$(TORCH_VENV)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/) into site/; warnings are errors.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

check: lint test

# Every figure of the performance table, side by side in one run (--quick: under 4 minutes).
bench: setup
	$(PY) benchmarks/run.py --json benchmarks/results.json

bench-quick: setup
	$(PY) benchmarks/run.py --quick

# Applies scripted bugs to the core promises, one at a time in a scratch copy, and
# reports which the tests catch (the kill ratio); fails unless every one is caught.
mutate: setup
	$(PY) tools/mutate.py

clean:
	rm -rf $(VENV) .venv-torch-* site .pytest_cache .mypy_cache .ruff_cache .coverage
