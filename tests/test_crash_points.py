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

docs/failure-points.md is this table (`python -m tests.test_crash_points` prints it).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest

from shared.events import REFRESH_FAILED, REFRESHED
from tests.helpers import APP_ROOT, iso
from tests.test_faults import Host, fault_env  # noqa: F401 - fixture
from tools.stand_in_manager import Answer, Call

pytestmark = pytest.mark.timeout(90)

CONNECTION = {"id": "conn-1", "tenantId": "t-1", "integrationId": "zoom", "status": "active"}
READ_TIMEOUT_S = 1.0
DOCS_TABLE = APP_ROOT / "docs" / "failure-points.md"


@dataclass
class Run:
    """What a scenario can reach: the Cosmos server, the manager's behaviour, the running host."""

    cosmos: object
    connections: str  # the connections container's name
    states: str  # the state container's name
    pid: int = 0


@dataclass(frozen=True)
class Scenario:
    step: str
    fault: str
    outcome: str  # REFRESHED or REFRESH_FAILED
    arm: Callable[[Run], None] = lambda run: None  # sets the fault up once the host runs
    manager: Callable[[Run], Callable[[Call], Answer]] | None = None  # the manager's script
    rejects: bool = False  # the manager answers 400 invalid_grant (a permanent failure)

    @property
    def id(self) -> str:
        return f"{self.step} / {self.fault}".replace(" ", "-")


def cosmos(
    path: str, partition_key: str, method: str = "POST", kill: str | None = None, **rule
) -> Callable[[Run], None]:
    """A fault on the Cosmos server for requests to `path` (formatted with the run's container
    names) whose partition key header matches `partition_key`. `kill="before"|"after"` kills the host."""

    def arm(run: Run) -> None:
        run.cosmos.inject_fault(
            method=method,
            path=path.format(connections=run.connections, states=run.states),
            partition_key=partition_key,
            kill_pid=run.pid if kill else None,
            when=kill or "before",
            **rule,
        )

    return arm


CONNECTION_READ = "/colls/{connections}/docs/?$"
STATE_DOCS = "/colls/{states}/docs/?$"


def first_call(answer: Callable[[Run], Answer]) -> Callable[[Run], Callable[[Call], Answer]]:
    """The manager's script: `answer(run)` for the first call, a refresh for any later one."""

    def script_for(run: Run) -> Callable[[Call], Answer]:
        calls = []

        def script(call: Call) -> Answer:
            calls.append(call)
            return answer(run) if len(calls) == 1 else Answer(200)

        return script

    return script_for


def finish_late(answer: Answer) -> Answer:
    """The manager works past the app's read timeout, then does what `answer` says (e.g. refresh)."""
    time.sleep(READ_TIMEOUT_S + 0.5)
    return answer


def kill_host(run: Run, answer: Answer) -> Answer:
    os.kill(run.pid, signal.SIGKILL)
    return answer


SCENARIOS = [
    # One refresh delivery ------------------------------------------------------------------------
    Scenario("connection re-read", "HTTP 500", REFRESHED, cosmos(CONNECTION_READ, "t-1")),
    Scenario("connection re-read", "SIGKILL before", REFRESHED, cosmos(CONNECTION_READ, "t-1", kill="before")),
    Scenario("claim create", "HTTP 500", REFRESHED, cosmos(STATE_DOCS, "claim-")),
    Scenario("claim create", "SIGKILL before", REFRESHED, cosmos(STATE_DOCS, "claim-", kill="before")),
    Scenario("claim create", "SIGKILL after", REFRESHED, cosmos(STATE_DOCS, "claim-", kill="after")),
    Scenario("manager call", "HTTP 503", REFRESHED, manager=first_call(lambda run: Answer(503))),
    Scenario(
        "manager call",
        "timeout, the manager refreshes after the app stopped waiting",
        REFRESHED,
        manager=first_call(lambda run: finish_late(Answer(200))),
    ),
    Scenario(
        "manager call",
        "timeout, the manager gives up (504)",
        REFRESHED,
        manager=first_call(lambda run: Answer(504, delay_s=READ_TIMEOUT_S + 0.5)),
    ),
    Scenario(
        "manager call",
        "connection dropped after the refresh",
        REFRESHED,
        manager=first_call(lambda run: Answer(200, drop_connection=True)),
    ),
    Scenario(
        "manager call",
        "SIGKILL during the call, the manager refreshes",
        REFRESHED,
        manager=first_call(lambda run: kill_host(run, Answer(200))),
    ),
    Scenario(
        "manager call",
        "SIGKILL during the call, the manager gives up",
        REFRESHED,
        manager=first_call(lambda run: kill_host(run, Answer(503))),
    ),
    Scenario("manager call", "HTTP 400 invalid_grant (permanent)", REFRESH_FAILED, rejects=True),
    Scenario(
        "failure record",
        "HTTP 500 (every time)",
        REFRESH_FAILED,
        cosmos(STATE_DOCS, "failure-", times=-1),
        rejects=True,
    ),
    Scenario(
        "failure record", "SIGKILL before", REFRESH_FAILED, cosmos(STATE_DOCS, "failure-", kill="before"), rejects=True
    ),
    Scenario("claim finish (after publish)", "HTTP 500", REFRESHED, cosmos(STATE_DOCS, "claim-", skip=1)),
    Scenario(
        "claim finish (after publish)", "SIGKILL before", REFRESHED, cosmos(STATE_DOCS, "claim-", skip=1, kill="before")
    ),
    Scenario(
        "claim finish (before the ack)", "SIGKILL after", REFRESHED, cosmos(STATE_DOCS, "claim-", skip=1, kill="after")
    ),
    # The check's page loop -----------------------------------------------------------------------
    Scenario("check: expiring-connections query", "HTTP 500", REFRESHED, cosmos(CONNECTION_READ, "^$")),
    Scenario(
        "check: expiring-connections query", "SIGKILL before", REFRESHED, cosmos(CONNECTION_READ, "^$", kill="before")
    ),
    Scenario("check: failure-record lookup", "HTTP 500", REFRESHED, cosmos(STATE_DOCS, "^$")),
]


def docs_table() -> str:
    rows = [
        "| step | fault | outcome |",
        "|---|---|---|",
        *(f"| {s.step} | {s.fault} | `{s.outcome.removeprefix('integration.token.')}` |" for s in SCENARIOS),
    ]
    return "\n".join(rows) + "\n"


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


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_the_guarantees_hold_at_every_crash_point(
    scenario,
    fault_env,  # noqa: F811 - the fixture imported above
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
        "TOKEN_REFRESH_CLAIM_LEASE_MS": "3000",
    }
    run = Run(cosmos_server, cosmos_container.id, app_env["COSMOS_STATE_CONTAINER"])
    if scenario.rejects:
        manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    elif scenario.manager is not None:
        manager.script = scenario.manager(run)
    try:
        outcome = run_until_settled(env, run, scenario, tmp_path)
    finally:
        cosmos_server.clear_faults()
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


def test_the_docs_table_is_the_scenario_table():
    text = DOCS_TABLE.read_text(encoding="utf-8")
    assert docs_table() in text, (
        f"{DOCS_TABLE} is out of date: run `python -m tests.test_crash_points` and paste its table"
    )


if __name__ == "__main__":
    sys.stdout.write(docs_table())
