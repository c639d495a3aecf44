"""Per-process singletons: settings and clients are built once per worker process and reused by
every invocation (a new TCP/TLS connection per message is slow and expensive). Thread-safe: the
Python worker may run several invocations on threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from shared.settings import Settings, load_settings, warn_about_risky_threshold

if TYPE_CHECKING:
    from shared.connection_store import ConnectionStore
    from shared.manager_client import IntegrationManagerClient
    from shared.messaging import EventPublisher

T = TypeVar("T")
_lock = threading.RLock()
_instances: dict[str, Any] = {}


def _once(name: str, build: Callable[[], T]) -> T:
    instance = _instances.get(name)
    if instance is None:
        with _lock:
            instance = _instances.get(name)
            if instance is None:
                instance = _instances[name] = build()
    return instance


def settings() -> Settings:
    def build() -> Settings:
        loaded = load_settings()
        warn_about_risky_threshold(loaded)
        return loaded

    return _once("settings", build)


def publisher() -> EventPublisher:
    from shared.messaging import publisher_from_settings

    return _once("publisher", lambda: publisher_from_settings(settings()))


def connection_store() -> ConnectionStore:
    from shared.connection_store import ConnectionStore

    return _once("connection_store", lambda: ConnectionStore.from_settings(settings()))


def manager_client() -> IntegrationManagerClient:
    from shared.manager_client import IntegrationManagerClient

    return _once("manager_client", lambda: IntegrationManagerClient.from_settings(settings()))


def reset() -> None:
    """Close and forget every client (tests, and the local host when it stops)."""
    with _lock:
        for instance in _instances.values():
            close = getattr(instance, "close", None)
            if close is not None:
                close()
        _instances.clear()
