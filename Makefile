# `make run` trains the default config; `make test` runs the test suite. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test protos
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/mso run $(ARGS)

test: $(VENV)/.installed
	$(PY) scripts/gen_protos.py --check
	$(PY) -m pytest -q $(PYTEST_ARGS)

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py
