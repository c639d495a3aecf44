"""The test layers, and the fixtures the integration and end-to-end tests share.

Each test lives in the folder of its layer and gets that layer's marker from it
(``pytest_collection_modifyitems`` below), so ``pytest tests/unit`` and ``pytest -m unit`` run the same:

- ``tests/unit`` (``unit``): no services at all, runs on a machine with only Python (``make unit``);
- ``tests/integration`` (``integration``): real local services: RabbitMQ, the Cosmos-compatible server,
  the stand-in integration-manager, the real Functions worker;
- ``tests/e2e`` (``e2e``): the app as a program (``python -m localdev ...``, the CLI's commands) against
  the real local services: full cycles, crash points, faults and broker restarts;
- ``tests/deploy`` (``deploy``): scripts/deploy.sh's dry runs through the real Azure CLI, the deploy package.

Real services (RabbitMQ, the Cosmos-compatible server, Azurite) are started once per session by
``tests/support/service_fixtures.py`` (a plugin, ``pytest_plugins`` below): right after collection, every service
a selected test needs starts in a background thread, all of them at once, while the first tests run (never for the
unit layer alone); a test that asks for one waits for its start, and fails with the service's log if it did not
start. Each test gets its own Cosmos container, RabbitMQ exchange and queue prefix so tests never see each other's
data. Support code shared by several test modules lives in ``tests/support/``.
"""

import contextlib
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from azure.cosmos import CosmosClient, PartitionKey
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from localdev.stand_in_manager import StandInManager
from shared import check_timer, runtime
from tests.support.canaries import broker_url_with_canary_password, debug_logs, secret_env  # noqa: F401 - fixtures
from tests.support.event_taps import DurableTap, EventTap
from tests.support.helpers import MANAGER_TOKEN

# rabbitmq, cosmos_server, azurite: started concurrently in the background once the tests are collected.
pytest_plugins = ["tests.support.service_fixtures", "tests.support.simulation_report"]

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e", "deploy")  # a folder and a marker each (pyproject.toml)
# What a unit test may not ask for: each starts a service (or is one).
SERVICE_FIXTURES = {"rabbitmq", "cosmos_server", "azurite", "manager", "functions_worker"}

# The real-worker tests need the worker Azure runs for Python 3.13 apps (azure-functions-runtime-v1,
# Python >= 3.13 only); on 3.11/3.12 the worker is part of the Functions host and cannot be installed.
# CI runs the suite on 3.13 first, so they always run there (see pytest_report_header).
REAL_WORKER_PYTHON = (3, 13)
REAL_WORKER_MODULES = ["integration/test_real_worker.py", "integration/test_service_bus_on_model.py"]
collect_ignore = [] if sys.version_info >= REAL_WORKER_PYTHON else REAL_WORKER_MODULES


def pytest_configure(config: pytest.Config) -> None:
    """The local host's state (its duplicate detection history, localdev/local_host.py) goes to a directory of this
    run's own, not the checkout's .local/, so runs never see each other's history. CLI subprocesses inherit it."""
    os.environ.setdefault("LOCALDEV_STATE_DIR", tempfile.mkdtemp(prefix="localdev-state-"))


def pytest_report_header() -> str:
    if collect_ignore:
        return f"real-worker tests: not collected on Python {sys.version.split()[0]} (they run on 3.13)"
    return "real-worker tests: collected (azure-functions-runtime-v1 on Python 3.13)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, from its folder; refuse a test outside the layer folders, and a
    unit test that asks for a service."""
    misplaced, unit_with_services = set(), []
    for item in items:
        try:
            layer = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/
            continue
        if layer not in LAYERS:
            misplaced.add(f"tests/{layer}")
            continue
        item.add_marker(getattr(pytest.mark, layer))
        if layer == "unit" and (services := SERVICE_FIXTURES.intersection(item.fixturenames)):
            unit_with_services.append(f"{item.nodeid} (asks for {', '.join(sorted(services))})")
    if misplaced:
        raise pytest.UsageError(
            f"{', '.join(sorted(misplaced))}: every test module lives in one of tests/{{{','.join(LAYERS)}}}/ "
            "(docs/development.md, 'Test layers')"
        )
    if unit_with_services:
        raise pytest.UsageError(
            "unit tests use no services; move these to tests/integration or tests/e2e:\n  "
            + "\n  ".join(unit_with_services)
        )


for _noisy in ("azure", "pika", "urllib3"):  # as the app does (shared.runtime.QUIET_LOGGERS)
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def functions_worker():
    """The real Functions worker with every function of the app loaded: one per process, like the worker itself
    (its registry is module-global), shared by every real-worker test module."""
    from tests.support.functions_worker import FunctionsWorker
    from tests.support.helpers import APP_ROOT

    worker = FunctionsWorker(APP_ROOT).start()
    worker.load_all()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def cosmos_database(cosmos_server):
    client = CosmosClient(cosmos_server.endpoint, credential=cosmos_server.key)
    return client.create_database_if_not_exists("integrations")


@pytest.fixture
def cosmos_container(cosmos_database):
    name = f"connections_{uuid.uuid4().hex[:10]}"
    container = cosmos_database.create_container(name, partition_key=PartitionKey(path="/tenantId"))
    yield container
    cosmos_database.delete_container(name)


@pytest.fixture
def exchange():
    return f"test.events.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def tap(rabbitmq, exchange):
    durable = DurableTap(rabbitmq.url, exchange)
    yield durable
    durable.close()


@pytest.fixture
def event_tap(rabbitmq, exchange):
    tap = EventTap(rabbitmq.url, exchange)
    yield tap
    tap.close()


@pytest.fixture
def manager():
    with StandInManager() as server:
        yield server


@pytest.fixture
def state_container_name(cosmos_database):
    """The app's own state container for one test (the app creates it on first use)."""
    name = f"state_{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(CosmosResourceNotFoundError):
        cosmos_database.delete_container(name)


@pytest.fixture
def app_env(monkeypatch, rabbitmq, cosmos_server, cosmos_container, state_container_name, exchange, manager):
    """Application settings pointing the app at the real local services, as `func start` would."""
    values = {
        "TOKEN_REFRESH_ENABLED": "true",
        "TOKEN_REFRESH_INTERVAL_MS": "3600000",
        "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3900000",
        "COSMOS_ENDPOINT": cosmos_server.endpoint,
        "COSMOS_KEY": cosmos_server.key,
        "COSMOS_EMULATOR": "true",
        "COSMOS_DATABASE": "integrations",
        "COSMOS_CONNECTIONS_CONTAINER": cosmos_container.id,
        "COSMOS_STATE_CONTAINER": state_container_name,
        "RABBITMQ_URL": rabbitmq.url,
        "RABBITMQ_EXCHANGE": exchange,
        "INTEGRATION_MANAGER_URL": manager.url,
        "INTEGRATION_MANAGER_TOKEN": MANAGER_TOKEN,
        # Fast failure handling, same rules: 2 calls per delivery, 3 deliveries, millisecond back-off.
        "INTEGRATION_MANAGER_MAX_ATTEMPTS": "2",
        "INTEGRATION_MANAGER_BACKOFF_INITIAL_MS": "5",
        "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "5000",
        "INTEGRATION_MANAGER_IN_FLIGHT_MS": "2000",
        "TOKEN_REFRESH_MAX_DELIVERY_COUNT": "3",
        # Scheduled retries of transient failures (local host: delay queues) after 50 ms, 100 ms, ...
        "TOKEN_REFRESH_RETRY_DELAY_MS": "50",
    }
    for name in (
        "ServiceBusConnection",
        "ServiceBusConnection__fullyQualifiedNamespace",
        "TOKEN_REFRESH_SKIP_STATUSES",
        "TOKEN_REFRESH_RATE_LIMITS",
        "TOKEN_REFRESH_SPREAD_MS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    monkeypatch.setattr(check_timer, "cadence", check_timer.CheckCadence())
    yield values
    runtime.reset()
