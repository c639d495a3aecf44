# The two commands of the README: `make demo` (the pipeline once, on real local services) and
# `make test` (lint + the whole test suite). Both install what they need first (scripts/setup.sh).
PYTHON := .venv/bin/python

.PHONY: setup demo test lint run services-up services-down clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m tools.demo

test: setup lint
	$(PYTHON) -m pytest

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Long-running local host against the services in .local/services (see README "Run it locally").
services-up: setup
	$(PYTHON) -m tools.local_services start --state-dir .local/services

services-down:
	$(PYTHON) -m tools.local_services stop --state-dir .local/services

run: setup
	$(PYTHON) -m shared.cli run

clean:
	rm -rf .venv node_modules .local .pytest_cache .ruff_cache
