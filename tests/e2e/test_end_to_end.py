"""End to end: `python -m localdev` (the local host running the three functions' main()) against
real RabbitMQ and the Cosmos-compatible server, with a stand-in integration-manager that refreshes
by moving `oauth.expiresAt` forward in Cosmos and fails where scripted."""

import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pika
import pytest

from localdev.stand_in_manager import Answer
from shared.events import (
    CHECK_EXPIRING,
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    REFRESHED,
    SYSTEMIC_FAILURE,
    parse_event,
)
from tests.support.fleets import CANARY, build_fleet
from tests.support.helpers import APP_ROOT, CLI, MANAGER_TOKEN, iso, run_cli

EXPECTED_DATA_KEYS = {
    REFRESH_REQUESTED: {"connectionId", "integrationId", "tenantId", "expiresAt", "requestedAt"},
    REFRESHED: {"connectionId", "integrationId", "tenantId", "refreshedAt", "expiresAt"},
    REFRESH_FAILED: {"connectionId", "integrationId", "tenantId", "failedAt", "error", "retryable", "attempts"},
    CHECK_EXPIRING: {"timestamp", "thresholdTime"},
    SYSTEMIC_FAILURE: {"detectedAt", "windowStartedAt", "code", "httpStatus", "connections", "check"},
}


@pytest.mark.smoke  # also on Python 3.11/3.12 in CI (make test-other-python)
def test_full_cycle_over_a_mixed_fleet(cli_env, cosmos_container, manager, event_tap):
    now = datetime.now(UTC)
    # 302 connections: two pages of the query, every kind of document, 10 flaky ones (past the alarm's 5). Throughput
    # at scale is the benchmark's and the soak's (docs/scale.md), not a test's.
    documents, due, rejected, flaky, dots = build_fleet(now, size=300)
    for document in documents:
        cosmos_container.upsert_item(document)
    by_id = {d["id"]: d for d in documents}
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=2)

    def script(call):
        if call.connection_id in rejected:
            return Answer(400, {"error": "invalid_grant", "error_description": f"bad {CANARY}"})
        if call.connection_id in flaky:
            return Answer(503, {"message": "upstream down"})
        return Answer(200)

    manager.script = script
    result = run_cli(cli_env, "run", "--once")
    assert result.returncode == 0, result.stderr[-3000:]

    # Exactly one refresh call per due connection, except transient failures: one per attempt
    # (2 calls per delivery x 3 deliveries); nothing else touched.
    calls_per_connection = Counter(call.connection_id for call in manager.calls)
    assert set(calls_per_connection) == due
    assert {conn: n for conn, n in calls_per_connection.items() if n != 1} == dict.fromkeys(flaky, 6)
    called = {(c.integration_id, c.connection_id) for c in manager.calls}
    for integration_id, connection_id in called:
        assert by_id[connection_id]["integrationId"] == integration_id
    for call in manager.calls:
        assert call.headers["Authorization"] == f"Bearer {MANAGER_TOKEN}"
        assert call.body == {"tenantId": by_id[call.connection_id]["tenantId"]}

    # The right outcome event for each, every event in the documented shape.
    events = event_tap.drain()
    by_type: dict[str, list[dict]] = {}
    for captured in events:
        envelope, _ = parse_event(json.dumps(captured.body), captured.routing_key)
        assert captured.properties.message_id == envelope.id
        assert set(captured.body["data"]) == EXPECTED_DATA_KEYS[captured.routing_key]
        by_type.setdefault(captured.routing_key, []).append(captured.body)
    assert len(by_type[CHECK_EXPIRING]) == 1
    assert {e["data"]["connectionId"] for e in by_type[REFRESH_REQUESTED]} == due | dots
    assert len(by_type[REFRESH_REQUESTED]) == len(due | dots)
    refreshed = {e["data"]["connectionId"] for e in by_type[REFRESHED]}
    failed = {e["data"]["connectionId"]: e["data"] for e in by_type[REFRESH_FAILED]}
    assert refreshed == due - rejected - flaky
    assert set(failed) == rejected | flaky | dots
    for conn_id, data in failed.items():
        if conn_id in rejected:
            assert (data["error"]["code"], data["error"]["httpStatus"], data["retryable"]) == (
                "invalid_grant",
                400,
                False,
            )
        elif conn_id in flaky:
            # 2 calls per delivery x 3 deliveries, then the last delivery reports it.
            assert (data["error"]["httpStatus"], data["retryable"], data["attempts"]) == (503, True, 6)
        else:
            assert (data["error"]["code"], data["retryable"]) == ("invalid_connection_id", False)
    assert f"found {len(due | dots)}, refreshed {len(refreshed)}, failed {len(failed)}" in result.stdout
    # The flaky connections all failed the same way, with integration-manager's 503: one alarm, once.
    [alarm] = by_type[SYSTEMIC_FAILURE]
    data = alarm["data"]
    assert (data["code"], data["httpStatus"], data["connections"]) == ("server_error", 503, 5)
    assert result.stderr.count("Systemic refresh failure") == 1

    # No token value anywhere: events, logs, CLI output.
    everything = json.dumps([e.body for e in events]) + result.stdout + result.stderr
    assert CANARY not in everything
    assert MANAGER_TOKEN not in everything

    # Refreshed connections moved on and permanent failures are not requested again while their
    # document is unchanged: a dry run now lists only the transient failures.
    dry = run_cli(cli_env, "check", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{len(flaky)} connection(s) would be refreshed." in dry.stdout
    assert CANARY not in dry.stdout + dry.stderr


@pytest.mark.smoke  # also on Python 3.11/3.12 in CI (make test-other-python)
def test_a_malformed_message_is_retried_then_dead_lettered_for_inspection(cli_env, rabbitmq, exchange, manager):
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    channel = connection.channel()
    prefix = f"e2e-{uuid.uuid4().hex[:8]}."
    # First run declares the topology; then a broken message arrives and a second run handles it.
    first = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3")
    assert first.returncode == 0, first.stderr
    channel.basic_publish(
        exchange,
        REFRESH_REQUESTED,
        b'{"specversion": "1.0", "oops": true}',
        pika.BasicProperties(message_id="poison-1", delivery_mode=2),
    )
    result = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3")
    assert result.returncode == 1, result.stderr  # the summary, then one line: the cycle did not end cleanly
    assert "dead-lettered 1" in result.stdout
    assert "dead-lettered: sync_refresh_handler message poison-1: InvalidEventError" in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the cycle did not end cleanly: 1 message(s) dead-lettered (see above)"
    )
    assert result.stderr.count("Function sync_refresh_handler failed on message poison-1") == 3
    assert "dead-lettering to" in result.stderr
    _, properties, body = channel.basic_get(prefix + "refresh-requested.dead-letter", auto_ack=True)
    assert body == b'{"specversion": "1.0", "oops": true}'
    assert properties.message_id == "poison-1"
    assert manager.calls == []
    connection.close()


@pytest.mark.smoke  # also on Python 3.11/3.12 in CI (make test-other-python)
def test_run_keeps_going_on_the_interval_and_stops_cleanly_on_ctrl_c(cli_env, cosmos_container, manager):
    now = datetime.now(UTC)
    for n in range(5):
        cosmos_container.upsert_item(
            {
                "id": f"c{n}",
                "tenantId": "t",
                "integrationId": "google",
                "status": "active",
                "oauth": {"expiresAt": iso(now + timedelta(minutes=n))},
            }
        )
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=3)
    env = cli_env | {"TOKEN_REFRESH_INTERVAL_MS": "1000"}
    process = subprocess.Popen(
        [*CLI, "run", "--queue-prefix", f"fg-{uuid.uuid4().hex[:6]}."],
        cwd=APP_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(manager.calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # a few more timer runs: refreshed connections are no longer due
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert sorted(c.connection_id for c in manager.calls) == [f"c{n}" for n in range(5)]
    assert stderr.count("Published check-expiring event") >= 2
    assert stderr.count("Token refresh worker initialized and started") == 1
