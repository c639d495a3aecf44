"""Session-scoped pytest fixtures that start the real local services of ``localdev/local_services.py``.

``rabbitmq``, ``cosmos_server`` and ``azurite`` each yield a started service whose data and logs
live in a ``tmp_path_factory`` directory, and stop it at the end of the session. A service that
does not start makes every test that uses it fail (with the tail of the service's log); a test is
never skipped because a service is missing.

Use them from ``tests/conftest.py`` either way:

* ``pytest_plugins = ["tests.support.service_fixtures"]`` (what tests/conftest.py does): every service that a
  selected test needs starts in the background right after collection, each in a thread of its own, all at
  once, so their boots (RabbitMQ's ~4 s, the Node servers') overlap each other and the tests that run first; a
  test that asks for a service waits for that one only, and a start that failed fails it with the service's log;
* ``from tests.support.service_fixtures import azurite, cosmos_server, rabbitmq`` - no background start: each
  service starts when the first test that needs it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.local_services import Azurite, CosmosServer, RabbitMQ

_SERVICES: dict[str, type[RabbitMQ] | type[CosmosServer] | type[Azurite]] = {
    "rabbitmq": RabbitMQ,
    "cosmos_server": CosmosServer,
    "azurite": Azurite,
}


class _BackgroundStart:
    """Starts a service in a thread; ``result()`` waits and re-raises a start failure."""

    def __init__(self, service: RabbitMQ | CosmosServer | Azurite):
        self.service = service
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"start-{type(service).__name__}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.service.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the fixture, which re-raises it
            self.error = exc

    def result(self) -> RabbitMQ | CosmosServer | Azurite:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.service

    def discard(self) -> None:
        self._thread.join()
        if self.error is None:
            self.service.stop()


_BACKGROUND = pytest.StashKey[dict[str, _BackgroundStart]]()


def _tmp_dir(config: pytest.Config, name: str) -> Path:
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]  # what tmp_path_factory returns
    return factory.mktemp(name)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the services the collected tests need in the background (only when used as a plugin)."""
    if config.option.collectonly or not items:
        return
    needed = {name for item in items for name in getattr(item, "fixturenames", ()) if name in _SERVICES}
    if not needed:
        return
    started = config.stash.setdefault(_BACKGROUND, {})
    for name in sorted(needed, key=list(_SERVICES).index):
        if name not in started:
            started[name] = _BackgroundStart(_SERVICES[name](_tmp_dir(config, name)))

    def stop_unclaimed() -> None:  # e.g. the session was interrupted before a test asked for it
        for background in config.stash.get(_BACKGROUND, {}).values():
            background.discard()

    config.add_cleanup(stop_unclaimed)


def _provide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator:
    backgrounds = request.config.stash.get(_BACKGROUND, {})
    if name in backgrounds:
        service = backgrounds[name].result()
        del backgrounds[name]  # only now: if the wait is interrupted, the session cleanup stops it
    else:
        service = _SERVICES[name](tmp_path_factory.mktemp(name))
        service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def rabbitmq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """An isolated RabbitMQ node; ``rabbitmq.url`` is an amqp:// URL for pika."""
    yield from _provide(request, tmp_path_factory, "rabbitmq")


@pytest.fixture(scope="session")
def cosmos_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CosmosServer]:
    """A Cosmos DB-compatible server (in memory); use ``endpoint`` and ``key`` with ``CosmosClient``."""
    yield from _provide(request, tmp_path_factory, "cosmos_server")


@pytest.fixture(scope="session")
def azurite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite (blob/queue/table); ``connection_string`` is a full devstoreaccount1 connection string."""
    yield from _provide(request, tmp_path_factory, "azurite")
