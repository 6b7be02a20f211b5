# `make run` trains the default config; `make test` runs the test suite. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
PIP ?= $(VENV)/bin/pip
# pyproject's [minecraft] extra explains why these two go in with --no-deps
MINESTUDIO_NO_DEPS := minestudio==1.1.6 gym3==0.3.3

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,minecraft]'
	$(PY) -m pip install -q --no-deps $(MINESTUDIO_NO_DEPS)
	touch $@

.PHONY: install minecraft run test protos
install: $(VENV)/.installed

# MineStudio into an existing environment (pip's, not make's venv): PIP=/path/to/pip make minecraft
minecraft:
	$(PIP) install -e '.[minecraft]'
	$(PIP) install --no-deps $(MINESTUDIO_NO_DEPS)

run: $(VENV)/.installed
	$(VENV)/bin/mso run $(ARGS)

test: $(VENV)/.installed
	$(PY) scripts/gen_protos.py --check
	$(PY) -m pytest -q $(PYTEST_ARGS)

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py
