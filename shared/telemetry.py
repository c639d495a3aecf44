"""Log fields Application Insights can query: every log record written during an invocation carries
`invocationId` and `functionName`, and, once known, `connectionId`, `integrationId` and `tenantId`.

They are set as record attributes (what the Azure Monitor OpenTelemetry exporter turns into
customDimensions) and as `record.custom_dimensions` (what the OpenCensus handler reads), through a
log-record factory, so they reach whichever handler the Functions worker installs. The fields live in
a context variable: each invocation thread sees only its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_fields: ContextVar[dict[str, str]] = ContextVar("log_fields", default={})  # noqa: B039 - never mutated
_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Add the current fields to every log record created from now on (idempotent)."""
    global _installed  # noqa: PLW0603 - one process-wide factory
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            fields = _fields.get()
            if fields:
                for name, value in fields.items():
                    record.__dict__.setdefault(name, value)
                record.custom_dimensions = {**getattr(record, "custom_dimensions", {}), **fields}
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


@contextmanager
def invocation(context: Any, function_name: str) -> Iterator[None]:
    """The fields of one function invocation (`context` is the azure.functions.Context, or None)."""
    install()
    invocation_id = getattr(context, "invocation_id", None)
    fields = {"functionName": function_name} | ({"invocationId": str(invocation_id)} if invocation_id else {})
    token = _fields.set(fields)
    try:
        yield
    finally:
        _fields.reset(token)


def bind(**fields: str | None) -> None:
    """Add fields (e.g. connectionId) to the current invocation's log records."""
    _fields.set(_fields.get() | {name: str(value) for name, value in fields.items() if value is not None})


def current_fields() -> dict[str, str]:
    return dict(_fields.get())
