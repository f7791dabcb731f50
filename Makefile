# Two commands on a fresh machine: `make run` and `make test`.
# The venv is rebuilt only when pyproject.toml changes (stamp files), so re-running is fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: run test lint bench clean

# The browser tests drive Debian's Chromium through Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e '.[dev]'
	touch $(VENV)/.stamp-run $@

run: $(VENV)/.stamp-run
	$(BIN)/python run.py

$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive sh -c \
		'apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)'

test: $(VENV)/.stamp-dev $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(VENV)/.stamp-dev
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) outputs mlflow.db mlartifacts studies
