# taskd: `make run` starts a server and a local agent; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= var

.PHONY: run test install install-test lint typecheck schemas bench bench-quick faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/python -m taskd demo --dir $(RUN_DIR)

lint: install-test
	$(BIN)/ruff format --check taskd tests
	$(BIN)/ruff check taskd tests

typecheck: install-test
	$(BIN)/mypy taskd

test: lint typecheck
	$(BIN)/pytest

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run --quick

faults: install-test
	$(BIN)/python -m benchmarks.faults

schemas: install
	$(BIN)/taskd schemas

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache
