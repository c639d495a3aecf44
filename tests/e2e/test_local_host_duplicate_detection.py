"""The refresh queue's Service Bus duplicate detection on the local host (history window PT2H,
localdev/service_bus_queues.json): a refresh request whose MessageId the queue accepted within the window is dropped
when the host first takes it off the queue; a redelivery or a scheduled retry (a MessageId of its own, as on Azure)
is not. The history is one file per exchange and queue under LOCALDEV_STATE_DIR (a tmp dir here), shared by `run
--once` processes one after another as Azure hosts share one queue. Real RabbitMQ, Cosmos-compatible server and
stand-in manager; the host in process (`run_once`) or as `python -m localdev run --once`."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import localdev.local_host
from localdev.local_host import CycleSummary, LocalHost, LocalInvocationContext, duplicate_history_path
from localdev.stand_in_manager import Answer, Call
from shared import runtime
from shared.events import REFRESH_FAILED, REFRESHED, SYSTEMIC_FAILURE, CloudEvent
from shared.settings import load_settings
from tests.support.documents import request_for, seed_connection, seed_expiring
from tests.support.event_taps import of_type, publish
from tests.support.helpers import MANAGER_TOKEN, cli_environment, run_cli

DROPPED = re.compile(
    r"Duplicate refresh request (\S+) dropped, as Service Bus duplicate detection would \(history window 2 h\)"
)


@pytest.fixture
def state_dir(monkeypatch, tmp_path) -> Path:
    """The local host's state directory of this test: its duplicate detection history, and nobody else's."""
    path = tmp_path / "localdev-state"
    monkeypatch.setenv("LOCALDEV_STATE_DIR", str(path))
    return path


@pytest.fixture
def requests_only(app_env, monkeypatch, cosmos_container, manager, state_dir):
    """The services of app_env, the timer off (only the tests' requests), the manager refreshing in Cosmos."""
    monkeypatch.setenv("TOKEN_REFRESH_ENABLED", "false")
    runtime.reset()
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=3)
    return app_env


@contextlib.contextmanager
def invocations(monkeypatch) -> Iterator[Counter[str]]:
    """How many times the host invoked each function (it makes one invocation context per call)."""
    counted: Counter[str] = Counter()

    class CountingContext(LocalInvocationContext):
        def __init__(self, function_name: str):
            super().__init__(function_name)
            counted[function_name] += 1

    monkeypatch.setattr(localdev.local_host, "LocalInvocationContext", CountingContext)
    yield counted


def run_once_in_process(*events: CloudEvent, url: str, exchange: str) -> tuple[CycleSummary, LocalHost]:
    """`run --once` in this process on queues of its own, after publishing `events` to them."""
    host = LocalHost(load_settings(), queue_prefix=f"dedup-{uuid.uuid4().hex[:8]}.")
    try:
        host.connect()  # its queues, bound to the exchange
        publish(url, exchange, *events)
        return host.run_once(), host
    finally:
        host.close()
        runtime.reset()


def history(host: LocalHost) -> list[str]:
    """The MessageIds in the refresh queue's history file, in the order accepted."""
    path = duplicate_history_path(host.settings, host.refresh_queue)
    return [json.loads(line)[0] for line in path.read_text("utf-8").splitlines()]


def test_the_same_request_sent_twice_is_refreshed_once_and_the_copy_dropped(
    requests_only, rabbitmq, exchange, cosmos_container, manager, event_tap, caplog, monkeypatch, state_dir
):
    """Two sends of one request before the host consumes (two overlapping checks): Service Bus accepts the first
    and drops the second; so does the local host, when it takes the copy off the queue."""
    caplog.set_level(logging.INFO, logger="localdev.local_host")
    event = request_for("c-1", seed_connection(cosmos_container, "c-1"))
    with invocations(monkeypatch) as counted:
        summary, host = run_once_in_process(event, event, url=rabbitmq.url, exchange=exchange)
    assert (summary.found, summary.refreshed, summary.failed, summary.dead_lettered) == (1, 1, 0, 0)
    assert counted["sync_refresh_handler"] == 1
    assert [call.connection_id for call in manager.calls] == ["c-1"]
    assert DROPPED.findall(caplog.text) == [event.id]
    [line] = [r for r in caplog.records if DROPPED.search(r.getMessage())]
    assert line.levelno == logging.INFO
    assert len(of_type(event_tap.drain(), REFRESHED)) == 1
    assert history(host) == [event.id]
    assert duplicate_history_path(host.settings, host.refresh_queue).is_relative_to(state_dir)


def test_a_request_redelivered_after_a_failed_invocation_is_not_dropped(
    requests_only, rabbitmq, exchange, cosmos_container, manager, caplog, monkeypatch
):
    """Without scheduled retries a transient failure raises and the queue delivers the same message again: that is
    no new send, and duplicate detection (Azure's, the local host's) lets it through."""
    monkeypatch.setenv("TOKEN_REFRESH_RETRY_DELAY_MS", "0")
    runtime.reset()
    caplog.set_level(logging.INFO, logger="localdev.local_host")
    answers = iter([Answer(503), Answer(503)])  # the first delivery's 2 calls
    manager.script = lambda call: next(answers, Answer(200))
    event = request_for("c-1", seed_connection(cosmos_container, "c-1"))
    with invocations(monkeypatch) as counted:
        summary, _ = run_once_in_process(event, url=rabbitmq.url, exchange=exchange)
    assert (summary.found, summary.refreshed, summary.failed) == (1, 1, 0)
    assert counted["sync_refresh_handler"] == 2
    assert [call.status for call in manager.calls] == [503, 503, 200]
    assert "delivery 1 of 3" in caplog.text and "will retry" in caplog.text
    assert not DROPPED.search(caplog.text)


def test_a_transient_failure_comes_back_as_a_scheduled_retry_with_a_message_id_of_its_own_and_is_refreshed(
    requests_only, rabbitmq, exchange, cosmos_container, manager, event_tap, caplog, monkeypatch
):
    """TOKEN_REFRESH_RETRY_DELAY_MS=50: the failed delivery schedules a copy of the request and completes. On Azure
    that copy is sent with MessageId `<id>.retry-<round>.<n>`, which duplicate detection has not seen; the local
    host's retry has that MessageId too (a header), goes through its duplicate detection, and is refreshed."""
    caplog.set_level(logging.INFO, logger="localdev.local_host")
    answers = iter([Answer(503), Answer(503)])  # the first delivery's 2 calls
    manager.script = lambda call: next(answers, Answer(200))
    event = request_for("c-1", seed_connection(cosmos_container, "c-1"))
    with invocations(monkeypatch) as counted:
        summary, host = run_once_in_process(event, url=rabbitmq.url, exchange=exchange)
    assert (summary.found, summary.refreshed, summary.failed, summary.dead_lettered) == (1, 1, 0, 0)
    assert counted["sync_refresh_handler"] == 2  # the request, then its retry
    assert [call.status for call in manager.calls] == [503, 503, 200]
    assert "OAuth token refresh will be retried" in caplog.text
    assert not DROPPED.search(caplog.text)
    assert history(host) == [event.id, f"{event.id}.retry-0.1"]
    published = event_tap.drain()
    assert len(of_type(published, REFRESHED)) == 1 and of_type(published, REFRESH_FAILED) == []


def test_a_request_that_ended_retryable_is_refreshed_once_by_the_next_run_once_after_the_fix(
    app_env, cosmos_container, manager, event_tap, tmp_path
):
    """Two `run --once` processes sharing the queue's history, as two checks on Azure share the refresh queue: the
    first with a stale INTEGRATION_MANAGER_TOKEN (401: systemic, every request ends `refresh.failed` retryable), the
    second after the fix. The second check asks again for the same connections and expiries (the same request
    ids): only a new MessageId (its attempt round, shared.messaging.service_bus_message_id) gets past duplicate
    detection, and each connection must be refreshed exactly once."""
    now = datetime.now(UTC)
    connections = [f"conn-{n}" for n in range(6)]
    for n, connection_id in enumerate(connections):
        seed_expiring(cosmos_container, connection_id, now + timedelta(minutes=5 + n))
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=2)
    good = f"Bearer {MANAGER_TOKEN}"

    def answer(call: Call) -> Answer:
        return Answer(200) if call.headers.get("Authorization") == good else Answer(401, {"message": "invalid token"})

    manager.script = answer
    state = tmp_path / "localdev-state"
    env = cli_environment(app_env | {"LOCALDEV_STATE_DIR": str(state)})

    stale = run_cli(env | {"INTEGRATION_MANAGER_TOKEN": "stale-token-0123"}, "run", "--once")
    assert stale.returncode == 0, stale.stderr[-3000:]
    failed = of_type(event_tap.drain(), REFRESH_FAILED)
    assert sorted(f["data"]["connectionId"] for f in failed) == connections
    assert {(f["data"]["error"]["code"], f["data"]["retryable"]) for f in failed} == {("unauthorized", True)}
    [history_file] = state.glob("servicebus/*/*.duplicates.jsonl")
    assert len(history_file.read_text("utf-8").splitlines()) == len(connections)  # one MessageId per request

    fixed = run_cli(env, "run", "--once")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    dropped = DROPPED.findall(fixed.stderr)
    published = event_tap.drain()
    refreshed = Counter(call.connection_id for call in manager.calls if call.status == 200)
    assert dropped == [] and refreshed == Counter(dict.fromkeys(connections, 1)), (
        f"{len(dropped)} request(s) of the second check dropped as duplicates of the first's; refreshed: "
        f"{dict(refreshed)}\n{fixed.stdout}"
    )
    assert f"Cycle finished: found {len(connections)}, refreshed {len(connections)}, failed 0" in fixed.stdout
    assert sorted(e["data"]["connectionId"] for e in of_type(published, REFRESHED)) == connections
    assert of_type(published, REFRESH_FAILED) == [] and of_type(published, SYSTEMIC_FAILURE) == []
