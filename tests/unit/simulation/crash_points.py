"""The crash points of one refresh delivery (tests/support/crash_points.py, the table of docs/failure-points.md) as
simulation scenarios: the same step, the same fault, on the virtual clock, over a few interleavings each
(tests/unit/simulation/test_crash_points.py). The e2e layer runs only the crash points that need real processes
(a SIGKILL at a real socket, a connection dropped by the peer, the check's page loop); the simulation runs every
other one, and every refresh-delivery one besides.

A "SIGKILL after" a step is a crash before the next one; "HTTP 500" is a Cosmos fault at that operation.
"""

from __future__ import annotations

from collections.abc import Callable

from .scenarios import _scenario
from .world import CLAIM_WRITE, CLAIM_WRITE_AFTER_PUBLISH, Scenario

CONNECTION_READ = "connections.query"  # the delivery re-reads the connection (status, expiresAt)
CLAIM_CREATE = "state.create_item claim-"
FAILURE_RECORD = "state.upsert_item failure-"


def _at(prefix: str, action: str, script: list[str] | None = None) -> Callable[[], Scenario]:
    """The first delivery meets `action` ("fault" or "crash") as it is about to run the operation `prefix`."""
    return lambda: _scenario(script=script or ["ok"], at_label=[("", 1, prefix, action, 0.0)])


def _answers(*script: str) -> Callable[[], Scenario]:
    return lambda: _scenario(script=list(script))


def _failure_record_failing_every_time() -> Scenario:
    return _scenario(script=["invalid_grant"], always_fault=[FAILURE_RECORD])


# Crash point id (tests/support/crash_points.Scenario.id) -> its scenario here.
SIMULATED: dict[str, Callable[[], Scenario]] = {
    "connection-re-read-/-HTTP-500": _at(CONNECTION_READ, "fault"),
    "connection-re-read-/-SIGKILL-before": _at(CONNECTION_READ, "crash"),
    "claim-create-/-HTTP-500": _at(CLAIM_CREATE, "fault"),
    "claim-create-/-SIGKILL-before": _at(CLAIM_CREATE, "crash"),
    "claim-create-/-SIGKILL-after": _at("manager.call", "crash"),
    "manager-call-/-HTTP-503": _answers("503", "ok"),
    "manager-call-/-timeout,-the-manager-refreshes-after-the-app-stopped-waiting": _answers("timeout_refreshed", "ok"),
    "manager-call-/-timeout,-the-manager-gives-up-(504)": _answers("timeout", "ok"),
    "manager-call-/-connection-dropped-after-the-refresh": _answers("timeout_refreshed", "ok"),
    "manager-call-/-SIGKILL-during-the-call,-the-manager-refreshes": _at("manager.wait", "crash", ["ok"]),
    "manager-call-/-SIGKILL-during-the-call,-the-manager-gives-up": _at("manager.wait", "crash", ["503", "ok"]),
    "manager-call-/-HTTP-400-invalid_grant-(permanent)": _answers("invalid_grant"),
    "failure-record-/-HTTP-500-(every-time)": _failure_record_failing_every_time,
    "failure-record-/-SIGKILL-before": _at(FAILURE_RECORD, "crash", ["invalid_grant"]),
    "claim-finish-(before-publish)-/-HTTP-500": _at(CLAIM_WRITE, "fault"),
    "claim-finish-(before-publish)-/-SIGKILL-before": _at(CLAIM_WRITE, "crash"),
    "claim-finish-(before-publish)-/-SIGKILL-after": _at("publish", "crash"),
    "mark-published-(after-publish)-/-HTTP-500": _at(CLAIM_WRITE_AFTER_PUBLISH, "fault"),
}
