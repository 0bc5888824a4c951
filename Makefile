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

# The second tested environment: the newest Python on the machine (3.13, else 3.12; a pyenv
# install is found without a shim) with the newest releases pyproject's ranges allowed when
# constraints-latest.txt was recorded. `make latest-constraints` resolves the newest again and
# records them. No torch there (PyPI has CUDA builds only): the torch tests skip; the stored
# torch references (tests/data) stand in.
PYTHON_LATEST ?= $(shell .ci/newest-python)
VENV_LATEST := .venv-latest
STAMP_LATEST := $(VENV_LATEST)/.installed

$(STAMP_LATEST): pyproject.toml constraints-latest.txt
	@test -n "$(PYTHON_LATEST)" || { echo "no Python 3.12 or 3.13 found: set PYTHON_LATEST"; exit 1; }
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q -c constraints-latest.txt -e '.[test]'
	touch $(STAMP_LATEST)

.PHONY: demo test lint venv venv-latest test-latest latest-constraints
venv: $(STAMP)
venv-latest: $(STAMP_LATEST)

demo: $(STAMP)
	$(VENV)/bin/python -m train.main --config configs/demo.py --workdir workdirs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/python -m pytest

test-latest: $(STAMP_LATEST)
	$(VENV_LATEST)/bin/python --version
	$(VENV_LATEST)/bin/python -m pytest

latest-constraints:
	@test -n "$(PYTHON_LATEST)" || { echo "no Python 3.12 or 3.13 found: set PYTHON_LATEST"; exit 1; }
	rm -rf $(VENV_LATEST)
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q -e '.[test]'
	{ echo "# The second tested environment: $$($(VENV_LATEST)/bin/python --version), the newest"; \
	  echo "# releases within pyproject's ranges on $$(date -u +%F) (make latest-constraints)."; \
	  $(VENV_LATEST)/bin/pip freeze --exclude-editable; } > constraints-latest.txt
	touch $(STAMP_LATEST)
