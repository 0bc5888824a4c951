# Quick start: `make demo` runs the main job on the embedded dataset; `make test` runs the tests.
# Each makes the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# The tested versions (constraints.txt) within pyproject's ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[torch]' || echo "torch not installed: its tests are skipped"
	touch $(STAMP)

.PHONY: demo test lint venv
venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m train.main --config configs/demo.py --workdir workdirs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/python -m pytest
