# The two commands: `make demo` runs the whole flow; `make test` runs the test suite.
# Both create ./.venv and install the project (and its test extras) into it first.
# `make test` runs the suite in TEST_PROCESSES (4) pytest-xdist processes, a test file per process
# at a time (setup.cfg: --dist loadfile); `make test TEST_PROCESSES=0` runs it serially.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEST_PROCESSES ?= 4
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test services clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(BIN)/psa-writeback demo

services:
	bash .ci/services

test: install services
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES)

clean:
	rm -rf $(VENV) var *.egg-info .pytest_cache
