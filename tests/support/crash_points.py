"""The crash points of one refresh: every external step of a refresh delivery and of the check's page
loop, each with the faults that fit it (tests/e2e/test_crash_points.py runs each scenario and checks the
guarantees).

docs/failure-points.md is this table: `python -m tests.support.crash_points` prints it, and
tests/unit/test_crash_points.py fails when the doc differs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from localdev.stand_in_manager import Answer, Call
from shared.events import REFRESH_FAILED, REFRESHED
from tests.support.cosmos_faults import CosmosFaults
from tests.support.helpers import APP_ROOT

READ_TIMEOUT_S = 1.0
DOCS_TABLE = APP_ROOT / "docs" / "failure-points.md"


@dataclass
class Run:
    """What a scenario can reach: the Cosmos server, the manager's behaviour, the running host."""

    cosmos: CosmosFaults
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
    # Run end to end (tests/e2e/test_crash_points.py): a point that needs real processes -- a SIGKILL at a real
    # socket, a connection the peer drops, the check's page loop. Every refresh-delivery point also runs in the
    # simulation (tests/unit/simulation/crash_points.py), in seconds.
    e2e: bool = False

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
# A claim's etag-guarded replace (PUT): every write of it after its creation.
CLAIM_DOC = "/colls/{states}/docs/claim-[^/]+/?$"


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
    Scenario("claim create", "SIGKILL after", REFRESHED, cosmos(STATE_DOCS, "claim-", kill="after"), e2e=True),
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
        e2e=True,
    ),
    Scenario(
        "manager call",
        "SIGKILL during the call, the manager refreshes",
        REFRESHED,
        manager=first_call(lambda run: kill_host(run, Answer(200))),
        e2e=True,
    ),
    Scenario(
        "manager call",
        "SIGKILL during the call, the manager gives up",
        REFRESHED,
        manager=first_call(lambda run: kill_host(run, Answer(503))),
        e2e=True,
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
    # The outcome is recorded in the claim (a PUT) before it is published, and marked published after (a second PUT).
    Scenario("claim finish (before publish)", "HTTP 500", REFRESHED, cosmos(CLAIM_DOC, "claim-", method="PUT")),
    Scenario(
        "claim finish (before publish)",
        "SIGKILL before",
        REFRESHED,
        cosmos(CLAIM_DOC, "claim-", method="PUT", kill="before"),
    ),
    Scenario(
        "claim finish (before publish)",
        "SIGKILL after",
        REFRESHED,
        cosmos(CLAIM_DOC, "claim-", method="PUT", kill="after"),
        e2e=True,
    ),
    Scenario(
        "mark published (after publish)", "HTTP 500", REFRESHED, cosmos(CLAIM_DOC, "claim-", method="PUT", skip=1)
    ),
    Scenario(
        "mark published (before the ack)",
        "SIGKILL after",
        REFRESHED,
        cosmos(CLAIM_DOC, "claim-", method="PUT", skip=1, kill="after"),
        e2e=True,
    ),
    # The check's page loop -----------------------------------------------------------------------
    Scenario("check: expiring-connections query", "HTTP 500", REFRESHED, cosmos(CONNECTION_READ, "^$"), e2e=True),
    Scenario(
        "check: expiring-connections query",
        "SIGKILL before",
        REFRESHED,
        cosmos(CONNECTION_READ, "^$", kill="before"),
        e2e=True,
    ),
    Scenario("check: failure-record lookup", "HTTP 500", REFRESHED, cosmos(STATE_DOCS, "^$"), e2e=True),
]


def docs_table() -> str:
    from tests.unit.simulation.crash_points import SIMULATED

    def runs_in(scenario: Scenario) -> str:
        return " + ".join(
            where for where, runs in (("e2e", scenario.e2e), ("simulation", scenario.id in SIMULATED)) if runs
        )

    rows = [
        "| step | fault | outcome | runs in |",
        "|---|---|---|---|",
        *(
            f"| {s.step} | {s.fault} | `{s.outcome.removeprefix('integration.token.')}` | {runs_in(s)} |"
            for s in SCENARIOS
        ),
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(docs_table())
