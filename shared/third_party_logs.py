"""Third-party libraries' own log records (pika, the Azure SDKs, urllib3) are demoted to DEBUG.

Their ERROR records are not the app's errors: a refused RabbitMQ connection alone makes pika log
~20 ERROR lines and two tracebacks, which reach stderr and, in Azure, Application Insights as
errors, while the app reports the same failure once, in one line that says what to check. With
debug logging on (`python -m localdev -v`, PYTHON_ENABLE_DEBUG_LOGGING in Azure) they are shown,
as DEBUG records.

How: a library's top logger stops propagating and gets a handler that hands a DEBUG copy of each
record to the root logger's handlers -- only when the root logger is enabled for DEBUG. A filter on
the top logger would not do: logger filters do not see records logged on child loggers
(`pika.adapters.blocking_connection`), which only pass through the ancestors' handlers.
"""

from __future__ import annotations

import logging
import threading

# The Functions worker logs under "azure.functions" (e.g. "Native invocation failed"): those records
# are about the host running our code, not an SDK's chatter, and keep their level.
NOT_DEMOTED = ("azure.functions",)

_lock = threading.Lock()
_local = threading.local()


class _DemoteToDebug(logging.Handler):
    """Re-emits a library's records as DEBUG copies to the root logger's handlers."""

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: nothing here is shared state, and holding one while the root's handlers
        # take theirs would serialise every library record of every thread.
        if getattr(_local, "emitting", False):
            return False  # a root handler that logs through a library (an exporter's HTTP call): no loop
        root = logging.getLogger()
        if any(record.name == name or record.name.startswith(name + ".") for name in NOT_DEMOTED):
            forwarded = record
        elif root.isEnabledFor(logging.DEBUG):
            forwarded = logging.makeLogRecord(record.__dict__)
            forwarded.levelno, forwarded.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        else:
            return False
        _local.emitting = True
        try:
            root.callHandlers(forwarded)  # what propagation would do, past the library's top logger
        finally:
            _local.emitting = False
        return True

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        self.handle(record)


def demote_third_party_logs(names: tuple[str, ...] | list[str]) -> None:
    """Demote every record of the loggers `names` (and their children) to DEBUG. Call it after the
    root logger's level is set: a library's own level follows it (WARNING while the root is above
    DEBUG, so an SDK's per-request INFO records are not even built). Idempotent and thread-safe."""
    root_debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    with _lock:
        for name in names:
            library = logging.getLogger(name)
            library.setLevel(logging.NOTSET if root_debug else logging.WARNING)
            if not any(isinstance(handler, _DemoteToDebug) for handler in library.handlers):
                library.addHandler(_DemoteToDebug())
            library.propagate = False
