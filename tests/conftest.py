"""Fixtures shared by the integration and end-to-end tests.

Real services (RabbitMQ, the Cosmos-compatible server, Azurite) are started once per session by
`tests/service_fixtures.py`; each test gets its own Cosmos container, RabbitMQ exchange and queue
prefix so tests never see each other's data.
"""

import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pytest
from azure.cosmos import CosmosClient, PartitionKey
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from shared import check_timer, runtime
from tests.service_fixtures import azurite, cosmos_server, rabbitmq  # noqa: F401 - pytest fixtures
from tools.stand_in_manager import StandInManager

MANAGER_TOKEN = "manager-token-canary-0b7e1d"

# The real-worker tests need the worker Azure runs for Python 3.13 apps (azure-functions-runtime-v1,
# Python >= 3.13 only); on 3.11/3.12 the worker is part of the Functions host and cannot be installed.
# CI runs the suite on 3.13 first, so they always run there (see pytest_report_header).
REAL_WORKER_PYTHON = (3, 13)
collect_ignore = [] if sys.version_info >= REAL_WORKER_PYTHON else ["test_real_worker.py"]


def pytest_report_header() -> str:
    if collect_ignore:
        return f"real-worker tests: not collected on Python {sys.version.split()[0]} (they run on 3.13)"
    return "real-worker tests: collected (azure-functions-runtime-v1 on Python 3.13)"


for _noisy in ("azure", "pika", "urllib3"):  # as the app does (shared.runtime.QUIET_LOGGERS)
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def cosmos_database(cosmos_server):  # noqa: F811
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


@dataclass
class CapturedEvent:
    routing_key: str
    properties: Any
    body: dict


class EventTap:
    """An exclusive queue bound to every routing key of the exchange: sees every published event."""

    def __init__(self, url: str, exchange_name: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange_name, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, exchange_name, routing_key="#")

    def drain(self) -> list[CapturedEvent]:
        events = []
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return events
            events.append(CapturedEvent(method.routing_key, properties, json.loads(body)))

    def of_type(self, event_type: str) -> list[dict]:
        return [event.body for event in self.drain() if event.routing_key == event_type]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class DurableTap:
    """A durable queue bound to every routing key of the exchange. Unlike an exclusive queue it
    survives the broker restarting (the events are persistent), and it reconnects on its own."""

    def __init__(self, url: str, exchange: str):
        self.url = url
        self.exchange = exchange
        self.queue = f"tap.{uuid.uuid4().hex[:10]}"
        self.events: list[CapturedEvent] = []  # everything drained so far
        self._connection: Any = None
        self._channel: Any = None
        self._open()

    def _open(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            pika_logger = logging.getLogger("pika")
            level = pika_logger.level
            pika_logger.setLevel(logging.CRITICAL)  # refused while the broker restarts: expected, not news
            try:
                self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
            finally:
                pika_logger.setLevel(level)
            self._channel = self._connection.channel()
            self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            self._channel.queue_declare(self.queue, durable=True)
            self._channel.queue_bind(self.queue, self.exchange, routing_key="#")
        return self._channel

    def drain(self, timeout: float = 30) -> list[CapturedEvent]:
        """The events that arrived since the last drain (reconnecting while the broker restarts)."""
        deadline = time.monotonic() + timeout
        drained: list[CapturedEvent] = []
        while True:
            try:
                channel = self._open()
                while True:
                    method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                    if method is None:
                        self.events.extend(drained)
                        return drained
                    drained.append(CapturedEvent(method.routing_key, properties, json.loads(body)))
            except pika.exceptions.AMQPError:
                self._connection = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the broker is restarting

    def everything(self) -> list[CapturedEvent]:
        """Every event captured so far (draining what arrived meanwhile)."""
        self.drain()
        return self.events

    def wait_for(self, predicate: Callable[[list[CapturedEvent]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if predicate(self.events):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        try:
            self._open().queue_delete(self.queue)
            self._connection.close()
        except pika.exceptions.AMQPError:
            pass


@pytest.fixture
def tap(rabbitmq, exchange):  # noqa: F811
    durable = DurableTap(rabbitmq.url, exchange)
    yield durable
    durable.close()


@pytest.fixture
def event_tap(rabbitmq, exchange):  # noqa: F811
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
def app_env(monkeypatch, rabbitmq, cosmos_server, cosmos_container, state_container_name, exchange, manager):  # noqa: F811
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
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    monkeypatch.setattr(check_timer, "cadence", check_timer.CheckCadence())
    yield values
    runtime.reset()
