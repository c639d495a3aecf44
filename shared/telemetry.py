"""Log fields Application Insights can query: every log record written during an invocation carries
`invocationId` and `functionName`, and, once known, `connectionId`, `integrationId` and `tenantId`.

They are set as record attributes, through a log-record factory, so they reach whichever handler the
Functions worker installs; the Azure Monitor OpenTelemetry handler (PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY)
turns them into customDimensions. The fields live in a context variable: each invocation thread sees
only its own.

The invocation's trace context is attached the same way, so its log records carry the invocation's
operation id: the worker attaches it on its event loop but runs a sync main() on a thread pool, where
that context is not set (azure-functions-runtime-v1 1.2.0; tests/integration/test_real_worker.py shows
both).
"""

from __future__ import annotations

import logging
import sys
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
            for name, value in fields.items():
                record.__dict__.setdefault(name, value)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


@contextmanager
def invocation(context: Any, function_name: str) -> Iterator[None]:
    """The fields and trace context of one function invocation (`context`: the worker's Context)."""
    install()
    invocation_id = getattr(context, "invocation_id", None)
    fields = {"functionName": function_name} | ({"invocationId": str(invocation_id)} if invocation_id else {})
    token = _fields.set(fields)
    trace_token = _attach_trace_context(getattr(context, "trace_context", None))
    try:
        yield
    finally:
        if trace_token is not None:
            sys.modules["opentelemetry.context"].detach(trace_token)
        _fields.reset(token)


def _attach_trace_context(trace_context: Any) -> object | None:
    """Make the invocation's W3C trace context current on this thread, when OpenTelemetry is in use
    (the worker imported it to configure Azure Monitor); a no-op otherwise."""
    trace_parent = getattr(trace_context, "trace_parent", None)
    if not trace_parent or "opentelemetry.context" not in sys.modules:
        return None
    from opentelemetry import context as otel_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": trace_parent, "tracestate": getattr(trace_context, "trace_state", "") or ""}
    return otel_context.attach(TraceContextTextMapPropagator().extract(carrier))


def bind(**fields: str | None) -> None:
    """Add fields (e.g. connectionId) to the current invocation's log records."""
    _fields.set(_fields.get() | {name: str(value) for name, value in fields.items() if value is not None})
