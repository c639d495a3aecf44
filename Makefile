# The two commands of the README: `make demo` (the pipeline once, on real local services) and
# `make test` (lint + the whole test suite, every layer). Both install what they need first
# (scripts/setup.sh). `make unit` runs the unit layer alone on a machine with only Python.
# CI (.ci/run) runs `make test` on 3.13 and `make test-other-python` on 3.11 and 3.12: the unit layer and the
# e2e smoke tests (docs/development.md#how-ci-is-layered).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTHON_VERSION ?= 3.13
export PYTHON_VERSION
export VENV
AZCLI_VENV ?= .venv-azcli
export AZCLI_VENV

.PHONY: setup setup-python demo test unit smoke test-other-python worker-test bench soak lint run stand-in-manager services-up services-down clean azure-cli deploy

setup:
	bash scripts/setup.sh

# The venv and its packages only: no apt (RabbitMQ), no npm (Azurite, the Cosmos-compatible server).
setup-python:
	SETUP_SERVICES=0 bash scripts/setup.sh

demo: setup
	$(PYTHON) -m localdev.demo

# Every layer (~1,170 tests, ~4.5 min on 2 cores), in TEST_WORKERS pytest-xdist workers, a test module each at a time (--dist loadfile):
# the suite mostly waits (for services, subprocesses, timeouts), so more workers than cores pay. Each worker starts
# its own services at once, in the background, right after collection (tests/support/service_fixtures.py).
# TEST_WORKERS=0 runs it in one process (docs/development.md#where-the-time-goes).
TEST_WORKERS ?= 4
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup azure-cli lint
	$(PYTHON) -m pytest $(XDIST)

# The unit layer (tests/unit, docs/development.md): no services, no npm, no Azure CLI; runs in seconds.
unit: setup-python
	$(PYTHON) -m pytest tests/unit

# The e2e smoke tests (marker `smoke`, tests/e2e/test_end_to_end.py): `python -m localdev run --once` / `run` over
# the real local services, a full cycle each. Needs the services (apt, npm), not the Azure CLI.
smoke: setup
	$(PYTHON) -m pytest -m smoke

# What CI runs on the Pythons other than 3.13 (3.11, 3.12: PYTHON_VERSION=3.11 VENV=.venv-py311): the unit layer
# and the smoke tests, in one session. The whole suite runs once, on 3.13 (`make test`); lint is the same on every Python.
test-other-python: setup
	$(PYTHON) -m pytest $(XDIST) -m "unit or smoke"

# The app in the real Functions Python worker only (docs/functions-worker.md); Python 3.13 venv.
worker-test: setup
	$(PYTHON) -m pytest tests/integration/test_real_worker.py tests/integration/test_service_bus_on_model.py

# The Azure CLI in its own venv: tests/deploy/test_deploy.py parses every deploy command with it.
azure-cli:
	bash scripts/install-azure-cli.sh

# Deploy to Azure (docs/deploy.md); `make deploy ARGS=--dry-run` prints the az commands instead.
deploy:
	bash scripts/deploy.sh $(ARGS)

# Performance figures against baselines measured in the same run: bench/results.json, bench/RESULTS.md.
bench: setup
	$(PYTHON) bench/run.py

# The pipeline run continuously for minutes under every fault class: bench/soak-results.json, docs/scale.md#the-soak.
# SOAK_ARGS="--duration 90 --seed N" for a short run or a replay.
soak: setup
	$(PYTHON) bench/soak.py $(SOAK_ARGS)

lint: setup-python
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Long-running local services for `python -m localdev ...` (see docs/running-locally.md): starts
# them, writes local.settings.json (or rewrites the local services' ports in yours), creates the container and
# seeds sample connections. A failure is one `error:` line (LOCALDEV_DEBUG=1 adds the traceback).
services-up: setup
	$(PYTHON) -m localdev.local_services start --state-dir .local/services
	$(PYTHON) -m localdev.local_settings .local/services/services.json
	$(PYTHON) -m localdev.sample_data

services-down:
	$(PYTHON) -m localdev.local_services stop --state-dir .local/services

run: setup
	$(PYTHON) -m localdev run

stand-in-manager: setup
	$(PYTHON) -m localdev.stand_in_manager

clean:
	rm -rf .venv .venv-py311 .venv-py312 .venv-azcli node_modules .local .pytest_cache .ruff_cache
