# The two commands of README.md: `make run` (the stack) and `make test` (everything CI checks).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` installs what running needs (about 60 MB); everything else also the test
# toolchain (playwright, mypy, ruff, numpy...: about 420 MB).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SOURCES := pyproject.toml setup.py bus/_wire.pyx
# setuptools' generic notices (an editable install; the ext-modules table is "experimental")
# print as boxed warnings a newcomer takes for a failure; real errors still show
QUIET_SETUPTOOLS := PYTHONWARNINGS='ignore:Editable installation,ignore:`[tool.setuptools.ext-modules]`'

.PHONY: run test test-compose lint bench venv screenshot clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Debian: apt-get install python3.11 python3.11-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip --quiet hides the build's warning when an optional accelerator was not built: say it
ACCELERATOR_CHECK := $(BIN)/python -c "import bus.transport as t; t.ACCELERATED or print('WARNING: bus._wire is off, pyzmq calls only (slower):', t.ACCELERATOR_PROBLEM)"

$(RUN_STAMP): $(BIN)/python $(SOURCES)
	$(QUIET_SETUPTOOLS) $(BIN)/python -m pip install --quiet -e .
	@$(ACCELERATOR_CHECK)
	touch $(RUN_STAMP)

$(TEST_STAMP): $(BIN)/python $(SOURCES)
	$(QUIET_SETUPTOOLS) $(BIN)/python -m pip install --quiet -e '.[test]'
	@$(ACCELERATOR_CHECK)
	touch $(TEST_STAMP) $(RUN_STAMP)

venv: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/tradebus up

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# the compose stack on a real Docker engine (installs and starts one when needed; root)
test-compose: $(TEST_STAMP)
	bash compose/ci/test-compose.sh

bench: $(TEST_STAMP)
	$(BIN)/python -m bench

# docs/dashboard.png: the dashboard as `make run` shows it (demo bot, headless Chromium)
screenshot: $(TEST_STAMP)
	$(BIN)/python tools/screenshot.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
