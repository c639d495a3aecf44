"""Whose problem is a failed refresh? The classification table of docs/failure-handling.md, row by
row against a real HTTP server (the stand-in manager), and what each kind does to a connection, against
the real local services: only the connection's own failure is held against it; a problem of ours (a
stale INTEGRATION_MANAGER_TOKEN) raises one alarm. Its recovery through the local host:
tests/e2e/test_failure_classes.py."""

import json
from datetime import UTC, datetime, timedelta

import pytest

import manager_check_handler
import sync_refresh_handler
from localdev.stand_in_manager import Answer, StandInManager
from shared import runtime
from shared.events import REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED, SYSTEMIC_FAILURE
from shared.failure_classes import FailureKind
from shared.manager_client import IntegrationManagerClient
from tests.support.documents import seed_expiring
from tests.support.event_taps import of_type
from tests.support.failure_table import ROWS, Row
from tests.support.helpers import MANAGER_TOKEN, check_event, invoke, refresh_request, trigger
from tests.support.network import closed_port


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_classification_table_row(row: Row):
    with StandInManager() as manager, StandInManager() as elsewhere:
        url, connection_id = manager.url, "conn-1"
        if row.answer.isdigit():
            status = int(row.answer)
            body = {"error": row.code_in_answer} if row.code_in_answer else None
            headers = {"Location": elsewhere.url + "/refresh"} if 300 <= status < 400 else {}
            manager.script = lambda call: Answer(status, body, headers)
        elif row.answer == "connection refused":
            url = f"http://127.0.0.1:{closed_port()}"
        elif row.answer == "no answer in time":
            manager.script = lambda call: Answer(200, {}, delay_s=1.0)
        else:
            assert row.answer == "id made only of dots (no call)"
            connection_id = ".."
        client = IntegrationManagerClient(url, MANAGER_TOKEN, connect_timeout_s=1.0, read_timeout_s=0.3)
        outcome = client.refresh_connection("salesforce", connection_id, "t-1")
        client.close()
    assert not outcome.succeeded
    assert (outcome.error_code, outcome.kind, outcome.retryable) == (row.event_code, row.kind, row.retryable)
    assert row.check in outcome.check, outcome.check
    # Only the connection's own failure is held against it; only a passing condition is retried.
    assert outcome.about_connection is (row.kind is FailureKind.CONNECTION)
    assert outcome.transient is (row.kind is FailureKind.TRANSIENT)


# What each kind does to a connection -------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "held_against_the_connection"),
    [
        (Answer(400, {"error": "invalid_grant"}), True),
        (Answer(404, {"error": "connection_not_found"}), True),
        (Answer(401, {"message": "bad token"}), False),
        (Answer(403), False),
        (Answer(404), False),  # a wrong base path, not a missing connection
        (Answer(301, None, {"Location": "http://127.0.0.1:9/"}), False),
        (Answer(409, {"error": "refresh_in_progress"}), False),
        (Answer(410), False),
        (Answer(422), False),
        # A 2xx that reports a failure is classified by its code; one that leaves the expiry where it was is an
        # unverified refresh, asked again by the next check (it used to end the request as done for 7 days).
        (Answer(200, {"success": False, "error": "invalid_grant"}, keep_document=True), True),
        (Answer(200, {"success": False, "error": "provider_down"}, keep_document=True), False),
        (Answer(200, {}, keep_document=True), False),
    ],
    ids=lambda value: f"{value.status}-{value.body}" if isinstance(value, Answer) else str(value),
)
def test_only_a_failure_of_the_connection_itself_keeps_the_next_check_from_asking_again(
    app_env, cosmos_container, manager, event_tap, answer, held_against_the_connection
):
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    seed_expiring(cosmos_container, "conn-1", expires_at)
    manager.script = lambda call: answer
    invoke(sync_refresh_handler, trigger(refresh_request("conn-1", "salesforce", "t-1", expires_at), delivery_count=3))
    [failed] = event_tap.of_type(REFRESH_FAILED)
    assert failed["data"]["retryable"] is not held_against_the_connection
    invoke(manager_check_handler, trigger(check_event()))
    requests = event_tap.of_type(REFRESH_REQUESTED)
    assert [r["data"]["connectionId"] for r in requests] == ([] if held_against_the_connection else ["conn-1"])
    if not held_against_the_connection:
        # ... as a new attempt, which a manager that now refreshes completes.
        manager.container, manager.script = cosmos_container, None
        invoke(sync_refresh_handler, trigger(json.dumps(requests[0]).encode(), message_id=requests[0]["id"]))
        assert [e["data"]["connectionId"] for e in event_tap.of_type(REFRESHED)] == ["conn-1"]
        first, second = (call.headers["Idempotency-Key"] for call in manager.calls[-2:])
        assert first != second


def test_a_retry_after_with_a_unicode_digit_is_a_failed_event_not_a_poison_message(
    app_env, cosmos_container, manager, event_tap
):
    # "²".isdigit() is True but float("²") raises: every delivery used to raise and be dead-lettered.
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    seed_expiring(cosmos_container, "conn-1", expires_at)
    manager.script = lambda call: Answer(503, None, {"Retry-After": "²"})
    invoke(sync_refresh_handler, trigger(refresh_request("conn-1", "salesforce", "t-1", expires_at), delivery_count=3))
    [failed] = event_tap.of_type(REFRESH_FAILED)
    assert (failed["data"]["error"]["code"], failed["data"]["retryable"]) == ("server_error", True)


# Systemic failures -------------------------------------------------------------------------------


def state_items(cosmos_database, name: str, kind: str) -> list[dict]:
    container = cosmos_database.get_container_client(name)
    return [item for item in container.read_all_items() if item.get("kind") == kind]


def test_many_connections_failing_the_same_way_raise_one_alarm_and_nothing_is_held_against_them(
    app_env, cosmos_container, cosmos_database, state_container_name, manager, event_tap, caplog, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD", "3")
    runtime.reset()
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    manager.script = lambda call: Answer(401, {"message": "token expired"})
    caplog.set_level("INFO")
    for n in range(6):
        seed_expiring(cosmos_container, f"conn-{n}", expires_at)
        invoke(sync_refresh_handler, trigger(refresh_request(f"conn-{n}", "salesforce", "t-1", expires_at)))
    published = event_tap.drain()
    assert len(of_type(published, REFRESH_FAILED)) == 6  # nothing is lost: each connection has its outcome
    [alarm] = of_type(published, SYSTEMIC_FAILURE)
    data = alarm["data"]
    assert (data["code"], data["httpStatus"], data["connections"]) == ("unauthorized", 401, 3)
    assert "INTEGRATION_MANAGER_TOKEN" in alarm["data"]["check"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.name for r in errors] == ["shared.failure_waves"]
    assert errors[0].alarm == "systemic_failure"
    assert "Check INTEGRATION_MANAGER_TOKEN" in errors[0].getMessage() and MANAGER_TOKEN not in caplog.text
    # Before the alarm each failure warns; after it, the same failures are INFO (one clear ERROR).
    per_connection = [r.levelname for r in caplog.records if r.getMessage().startswith("OAuth token refresh failed")]
    assert per_connection == ["WARNING"] * 3 + ["INFO"] * 3
    assert state_items(cosmos_database, state_container_name, "failure") == []


def test_most_of_a_wave_failing_with_a_connection_code_is_ours_one_alarm_and_all_asked_again_once_fixed(
    app_env, cosmos_container, manager, event_tap, caplog, monkeypatch
):
    # INTEGRATION_MANAGER_URL pointing at another environment: every connection is "not found". It used to leave
    # one failure record per connection, no alarm, and the whole fleet suppressed for 24 h after the fix.
    monkeypatch.setenv("TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD", "3")
    runtime.reset()
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    manager.script = lambda call: Answer(404, {"error": "connection_not_found"})
    caplog.set_level("INFO")
    for n in range(6):
        seed_expiring(cosmos_container, f"conn-{n}", expires_at)
        invoke(sync_refresh_handler, trigger(refresh_request(f"conn-{n}", "salesforce", "t-1", expires_at)))
    published = event_tap.drain()
    failed = of_type(published, REFRESH_FAILED)
    # Each connection has its outcome; from the wave's threshold on (3 of the 3 that ended), they are ours.
    assert [f["data"]["retryable"] for f in failed] == [False, False, True, True, True, True]
    [alarm] = of_type(published, SYSTEMIC_FAILURE)
    assert (alarm["data"]["code"], alarm["data"]["httpStatus"], alarm["data"]["connections"]) == (
        "connection_not_found",
        404,
        3,
    )
    assert "INTEGRATION_MANAGER_URL" in alarm["data"]["check"]
    # The cause is fixed: the next check asks again for every one of them (none held against it), and they refresh.
    manager.script, manager.container = None, cosmos_container
    invoke(manager_check_handler, trigger(check_event()))
    requests = event_tap.of_type(REFRESH_REQUESTED)
    assert sorted(r["data"]["connectionId"] for r in requests) == [f"conn-{n}" for n in range(6)]
    for request in requests:
        invoke(sync_refresh_handler, trigger(json.dumps(request).encode(), message_id=request["id"]))
    assert len(event_tap.of_type(REFRESHED)) == 6


def test_a_few_connections_failing_with_their_own_code_among_many_refreshed_are_each_their_own(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD", "3")
    runtime.reset()
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    broken = {"conn-2", "conn-5", "conn-8"}  # among the others, as failures of their own come
    manager.container, manager.token_lifetime = cosmos_container, timedelta(hours=3)  # refreshed: not due again
    manager.script = lambda call: (
        Answer(400, {"error": "invalid_grant"}, keep_document=True) if call.connection_id in broken else Answer()
    )
    for n in range(10):
        seed_expiring(cosmos_container, f"conn-{n}", expires_at)
        invoke(sync_refresh_handler, trigger(refresh_request(f"conn-{n}", "salesforce", "t-1", expires_at)))
    published = event_tap.drain()
    assert [f["data"]["retryable"] for f in of_type(published, REFRESH_FAILED)] == [False] * 3
    assert of_type(published, SYSTEMIC_FAILURE) == []
    invoke(manager_check_handler, trigger(check_event()))
    assert event_tap.of_type(REFRESH_REQUESTED) == []  # each failure stays held against its own connection
