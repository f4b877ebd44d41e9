# taskd: `make run` starts a server and a local agent; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= var

.PHONY: run test install install-test lint typecheck schemas bench bench-quick faults clean vendor chromium

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

# the dashboard's third-party assets: from npm (package-lock.json) into the package
VENDOR := taskd/ui/static/vendor
VENDOR_FILES := node_modules/uplot/dist/uPlot.esm.js node_modules/uplot/dist/uPlot.min.css \
	node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css \
	node_modules/@xterm/addon-fit/lib/addon-fit.mjs

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund

$(VENDOR)/.copied: node_modules/.package-lock.json
	mkdir -p $(VENDOR)
	cp $(VENDOR_FILES) $(VENDOR)/
	touch $@

vendor: $(VENDOR)/.copied

# the browser tests drive Debian's chromium (Playwright's own download is not used)
chromium:
	command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

install: $(VENV)/.installed vendor

install-test: $(VENV)/.installed-test vendor

run: install
	$(BIN)/python -m taskd demo --dir $(RUN_DIR)

lint: install-test
	$(BIN)/ruff format --check taskd tests
	$(BIN)/ruff check taskd tests

typecheck: install-test
	$(BIN)/mypy taskd

test: lint typecheck chromium
	$(BIN)/pytest -n 2

bench: $(VENV)/.installed-bench vendor chromium
	$(BIN)/python -m benchmarks.run

bench-quick: $(VENV)/.installed-bench vendor chromium
	$(BIN)/python -m benchmarks.run --quick

faults: install-test
	$(BIN)/python -m benchmarks.faults

schemas: install
	$(BIN)/taskd schemas

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache node_modules $(VENDOR)
