"""Crash points: every external step of one refresh delivery and of the check's page loop, each with
the faults that fit it, injected at the real services (the Cosmos server's fault hook, the stand-in
manager's script, a SIGKILL of the local host at the exact request). The local host then runs again
until redelivery has run its course, and the guarantees must hold:

- at least one outcome event for the request, of the expected type, every copy with the same id;
- exactly one refreshing call for a refreshed connection (none for a failed one), no call after the
  call that refreshed, and never two calls at once (a call starts after the earlier one was done);
- every message settled: the queues and their dead-letter queues are empty.

A call that reached integration-manager and got a definitive answer that changed nothing (503, 400)
may be followed by another: the invariants count calls that refreshed, and overlapping calls.

The scenarios are in tests/support/crash_points.py; docs/failure-points.md is their table
(`python -m tests.support.crash_points` prints it).
"""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest

from localdev.stand_in_manager import Answer
from shared.events import REFRESH_FAILED, REFRESHED
from tests.support.cosmos_faults import CosmosFaults
from tests.support.crash_points import READ_TIMEOUT_S, SCENARIOS, Run, Scenario
from tests.support.helpers import iso
from tests.support.host_process import Host

pytestmark = pytest.mark.timeout(90)

# The points that need real processes; the others run in the simulation (tests/unit/simulation/test_crash_points.py).
E2E = [scenario for scenario in SCENARIOS if scenario.e2e]

CONNECTION = {"id": "conn-1", "tenantId": "t-1", "integrationId": "zoom", "status": "active"}


# Running a scenario -------------------------------------------------------------------------------


@dataclass
class Outcome:
    runs: list[int] = field(default_factory=list)  # the exit code of each run of the host
    output: str = ""
    unfired: list[dict] = field(default_factory=list)  # Cosmos fault rules that never matched a request


def run_until_settled(env: dict, run: Run, scenario: Scenario, log_dir: Path) -> Outcome:
    """`run --once` with the fault armed; after a SIGKILL, again (redeliveries), without faults."""
    outcome = Outcome()
    for attempt in range(3):
        host = Host(env, log_dir, "--once")
        run.pid = host.process.pid
        if attempt == 0:
            scenario.arm(run)
        try:
            code = host.process.wait(timeout=60)
        finally:
            host.kill()
        outcome.runs.append(code)
        outcome.output += host.output()
        if attempt == 0:
            outcome.unfired = [rule for rule in run.cosmos.faults() if not rule.get("hits")]
        run.cosmos.clear_faults()
        if code != -signal.SIGKILL:
            return outcome
    return outcome


def queue_depths(url: str, prefix: str) -> dict[str, int]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        depths = {}
        for name in ("check-expiring", "refresh-requested"):
            for queue in (f"{prefix}{name}", f"{prefix}{name}.dead-letter"):
                depths[queue] = channel.queue_declare(queue, passive=True).method.message_count
        return depths
    finally:
        connection.close()


@pytest.mark.parametrize("scenario", E2E, ids=[s.id for s in E2E])
def test_the_guarantees_hold_at_every_crash_point(
    scenario,
    fault_env,
    app_env,
    cosmos_server,
    cosmos_container,
    manager,
    tap,
    rabbitmq,
    tmp_path,
):
    expires_at = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
    cosmos_container.upsert_item(
        CONNECTION | {"oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(expires_at)}}
    )
    env = fault_env | {
        "INTEGRATION_MANAGER_TIMEOUT_MS": str(int(READ_TIMEOUT_S * 1000)),
        "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "500",
        # As short as the settings allow: the calls window (budget 5 s + 0.5 s + the read timeout + in-flight 2 s).
        "TOKEN_REFRESH_CLAIM_LEASE_MS": str(5000 + 500 + int(READ_TIMEOUT_S * 1000) + 2000),
    }
    run = Run(CosmosFaults(cosmos_server), cosmos_container.id, app_env["COSMOS_STATE_CONTAINER"])
    if scenario.rejects:
        manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    elif scenario.manager is not None:
        manager.script = scenario.manager(run)
    try:
        outcome = run_until_settled(env, run, scenario, tmp_path)
    finally:
        run.cosmos.clear_faults()
    explain = f"runs={outcome.runs}\n" + "\n".join(outcome.output.splitlines()[-40:])
    assert outcome.runs[-1] == 0, explain
    # The fault did happen.
    assert outcome.unfired == [], f"the fault never matched a request: {outcome.unfired}\n{explain}"
    assert (outcome.runs[0] == -signal.SIGKILL) == ("SIGKILL" in scenario.fault), explain

    # At least one outcome event, of the expected type, every copy with one id.
    events = [e for e in tap.everything() if e.routing_key in (REFRESHED, REFRESH_FAILED)]
    assert {e.routing_key for e in events} == {scenario.outcome}, explain
    assert len({e.body["id"] for e in events}) == 1, explain

    # One refreshing call for a refreshed connection, none for a failed one; nothing after it; never
    # two calls at once.
    calls = sorted(manager.calls, key=lambda c: c.received_at)
    refreshing = [c for c in calls if c.refreshed]
    assert len(refreshing) == (1 if scenario.outcome == REFRESHED else 0), explain
    if refreshing:
        assert calls[-1] is refreshing[0], "a call after the call that refreshed\n" + explain
    for earlier, later in itertools.pairwise(calls):
        assert earlier.finished_at is not None and later.received_at >= earlier.finished_at, (
            "two calls at once\n" + explain
        )

    # Every message settled: nothing left in a queue or dead-lettered.
    assert set(queue_depths(rabbitmq.url, env["FAULT_QUEUE_PREFIX"]).values()) == {0}, explain
