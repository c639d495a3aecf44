"""Per-process singletons: settings and clients are built once per worker process and reused by
every invocation (a new TCP/TLS connection per message is slow and expensive). Thread-safe: the
Python worker may run several invocations on threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from shared.secrets import scrub_logs
from shared.settings import Settings, load_settings, warn_about_risky_threshold, warn_about_unknown_settings
from shared.third_party_logs import demote_third_party_logs

if TYPE_CHECKING:
    from shared.connection_store import ConnectionStore
    from shared.manager_client import IntegrationManagerClient
    from shared.messaging import EventPublisher, RetryScheduler
    from shared.state_store import StateStore

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


# Libraries whose own records go to DEBUG (shared.third_party_logs): an SDK logs every HTTP request,
# pika ~20 ERROR lines per refused connection; the app reports a failure once, in its own line.
QUIET_LOGGERS = ("azure", "pika", "urllib3")


def settings() -> Settings:
    """The process's settings, loaded and validated on first use. That first load also demotes SDK log records to
    DEBUG, masks the secrets in what the root logger's handlers emit, and warns about a risky threshold and about
    variables that look like misspelt settings. Raises SettingsError for a bad value; nothing is kept then, so the
    next call loads (and raises) again."""

    def build() -> Settings:
        demote_third_party_logs(QUIET_LOGGERS)
        loaded = load_settings()
        scrub_logs(loaded)  # every form of every secret setting is masked in what the root handlers emit
        warn_about_risky_threshold(loaded)
        warn_about_unknown_settings()
        return loaded

    return _once("settings", build)


def publisher() -> EventPublisher:
    """The process's EventPublisher (Service Bus and/or RabbitMQ, as configured), built on first use."""
    from shared.messaging import publisher_from_settings

    return _once("publisher", lambda: publisher_from_settings(settings()))


def cosmos_client() -> Any:
    """The process's CosmosClient, shared by both stores; built on first use."""
    from shared.connection_store import cosmos_client_from_settings

    return _once("cosmos_client", lambda: cosmos_client_from_settings(settings()))


def connection_store() -> ConnectionStore:
    """The process's ConnectionStore (the platform's connections, read-only); built on first use."""
    from shared.connection_store import ConnectionStore

    return _once("connection_store", lambda: ConnectionStore.from_settings(settings(), cosmos_client()))


def state_store() -> StateStore:
    """The process's StateStore (this app's claims and failure records); built on first use."""
    from shared.state_store import StateStore

    return _once("state_store", lambda: StateStore.from_settings(settings(), cosmos_client()))


def manager_client() -> IntegrationManagerClient:
    """The process's integration-manager client (one HTTP session); built on first use."""
    from shared.manager_client import IntegrationManagerClient

    return _once("manager_client", lambda: IntegrationManagerClient.from_settings(settings()))


def retry_scheduler() -> RetryScheduler | None:
    """Where a transient failure's retry is scheduled: the one a host installed (the local host's
    delay queues), else Service Bus when configured, else None (the queue redelivers at once)."""
    installed = _instances.get("retry_scheduler")
    return installed if installed is not None else publisher().retry_scheduler


def retry_scheduler_installed() -> RetryScheduler | None:
    """The scheduler a host installed, if any."""
    return _instances.get("retry_scheduler")


def use_retry_scheduler(scheduler: RetryScheduler | None) -> None:
    """Install the scheduler of the host that runs the functions (the local host; tests); None
    removes it (the host stopped)."""
    with _lock:
        if scheduler is None:
            _instances.pop("retry_scheduler", None)
        else:
            _instances["retry_scheduler"] = scheduler


def reset() -> None:
    """Close and forget every client (tests, and the local host when it stops)."""
    with _lock:
        for instance in _instances.values():
            close = getattr(instance, "close", None)
            if close is not None:
                close()
        _instances.clear()
