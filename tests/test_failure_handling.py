"""Failure handling that loses nothing and refreshes nothing twice: retries, claims, cooldown,
tokens without expiry. Real Cosmos-compatible server, RabbitMQ and the stand-in manager."""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

import manager_check_handler
import sync_refresh_handler
from shared import runtime
from shared.events import (
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    REFRESHED,
    CheckExpiringData,
    make_event,
    utc_now,
)
from shared.failure_classes import FailureKind
from shared.manager_client import RefreshOutcome, parse_retry_after
from shared.messaging import session_id
from shared.state_store import connection_key
from shared.token_refresh import RefreshRetryLater, call_with_retries
from tests.helpers import invoke, iso, refresh_request, trigger
from tools.stand_in_manager import Answer


def seed_connection(container, connection_id="c-1", expires_in=timedelta(minutes=5), **extra):
    expires_at = (utc_now() + expires_in).replace(microsecond=0)
    document = {
        "id": connection_id,
        "tenantId": "t-1",
        "integrationId": "zoom",
        "status": "active",
        "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(expires_at)},
    } | extra
    container.upsert_item(document)
    return expires_at


def request_for(connection_id, expires_at):
    return refresh_request(connection_id, "zoom", "t-1", expires_at)


def check_event(threshold=timedelta(hours=1)):
    now = utc_now()
    return make_event(CheckExpiringData(timestamp=now, threshold_time=now + threshold))


# Retries inside one invocation -------------------------------------------------------------------


def outcome(status=None, retry_after=None):
    if status is None:
        return RefreshOutcome(True, http_status=200)
    kind = FailureKind.TRANSIENT if status >= 500 or status == 429 else FailureKind.CONNECTION
    return RefreshOutcome(False, http_status=status, error_code="x", kind=kind, retry_after_s=retry_after)


def test_transient_failures_are_retried_with_growing_jittered_waits():
    answers = iter([outcome(503), outcome(503), outcome(None)])
    waits = []
    result, calls = call_with_retries(
        lambda: next(answers), max_attempts=5, budget_s=60, initial_backoff_s=0.5, sleep=waits.append
    )
    assert result.succeeded and calls == 3
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 1.5  # 0.5 * 2^n plus up to 0.5 s of jitter


def test_retry_after_is_honoured_when_longer_than_the_back_off():
    answers = iter([outcome(429, retry_after=7.0), outcome(None)])
    waits = []
    result, calls = call_with_retries(lambda: next(answers), 3, 60, 0.5, waits.append)
    assert result.succeeded and calls == 2 and waits == [7.0]


def test_a_wait_that_would_pass_the_budget_ends_the_invocation_instead():
    waits = []
    result, calls = call_with_retries(lambda: outcome(429, retry_after=120.0), 5, 30, 0.5, waits.append)
    assert (result.succeeded, calls, waits) == (False, 1, [])


def test_permanent_failures_are_not_retried():
    waits = []
    result, calls = call_with_retries(lambda: outcome(400), 5, 60, 0.5, waits.append)
    assert (result.retryable, calls, waits) == (False, 1, [])


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        ("999999", 3600.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("-5", None),
        ("²", None),  # str.isdigit() accepts it; float() does not
        ("١٢", None),  # Arabic-Indic digits: not HTTP's delta-seconds
    ],
)
def test_retry_after_parsing(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_http_date():
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now=now) == 30.0


# Across deliveries -------------------------------------------------------------------------------


def deliver_until_the_last_delivery_reports(request, event_tap):
    """Deliveries of a failing request: each but the last raises for redelivery and reports nothing
    (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3 in the test settings); the last one reports."""
    for delivery in (1, 2):
        with pytest.raises(RefreshRetryLater):
            invoke(sync_refresh_handler, trigger(request, delivery))
        assert event_tap.drain() == []  # nothing is reported while the queue will retry
    invoke(sync_refresh_handler, trigger(request, 3))


def a_request_that_failed_transiently(container, manager, event_tap):
    """Connection c-1 due, the manager answering 503 to every call, every delivery used up: the
    request, its expiry and the `refresh.failed` event its last delivery published."""
    expires_at = seed_connection(container)
    request = request_for("c-1", expires_at)
    manager.script = lambda call: Answer(503)
    deliver_until_the_last_delivery_reports(request, event_tap)
    [failed] = event_tap.of_type(REFRESH_FAILED)
    return request, expires_at, failed


def test_transient_failure_is_redelivered_then_reported_on_the_last_delivery(
    app_env, cosmos_container, manager, event_tap
):
    _, _, failed = a_request_that_failed_transiently(cosmos_container, manager, event_tap)
    assert failed["data"]["retryable"] is True
    assert failed["data"]["attempts"] == 6 == len(manager.calls)  # 2 calls x 3 deliveries


def test_transient_failure_then_success_ends_refreshed(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    answers = iter([Answer(503), Answer(503), Answer(200, {"expiresAt": iso(utc_now() + timedelta(hours=1))})])
    manager.script = lambda call: next(answers)
    request = request_for("c-1", expires_at)
    with pytest.raises(RefreshRetryLater):
        invoke(sync_refresh_handler, trigger(request, 1))
    invoke(sync_refresh_handler, trigger(request, 2))
    events = event_tap.drain()
    assert [e.routing_key for e in events] == [REFRESHED]
    assert len(manager.calls) == 3


def test_429_with_retry_after_waits_before_calling_again(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    answers = iter([Answer(429, headers={"Retry-After": "1"}), Answer(200)])
    stamps = []

    def script(call):
        stamps.append(time.monotonic())
        return next(answers)

    manager.script = script
    invoke(sync_refresh_handler, trigger(request_for("c-1", expires_at)))
    assert stamps[1] - stamps[0] >= 1.0
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


# No duplicate refresh ----------------------------------------------------------------------------


def test_a_redelivered_or_duplicate_request_is_not_refreshed_twice(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    manager.script = lambda call: Answer(200, {})  # does not move expiresAt: only the claim prevents a 2nd call
    invoke(sync_refresh_handler, trigger(request, 1))
    invoke(sync_refresh_handler, trigger(request, 2))  # redelivery after, say, a lost completion
    invoke(sync_refresh_handler, trigger(request_for("c-1", expires_at), 1))  # a second check's duplicate
    assert len(manager.calls) == 1
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


def test_a_request_whose_token_was_refreshed_since_is_not_called(app_env, cosmos_container, manager, event_tap):
    old_expiry = seed_connection(cosmos_container)
    seed_connection(cosmos_container, expires_in=timedelta(hours=1))  # refreshed by someone else meanwhile
    invoke(sync_refresh_handler, trigger(request_for("c-1", old_expiry)))
    assert manager.calls == []
    assert event_tap.drain() == []


@pytest.mark.parametrize("change", ["revoked", "deleted-document"])
def test_a_request_for_a_connection_revoked_or_deleted_since_is_not_called(
    app_env, cosmos_container, manager, event_tap, change
):
    expires_at = seed_connection(cosmos_container)
    if change == "revoked":
        seed_connection(cosmos_container, status="revoked")
    else:
        cosmos_container.delete_item("c-1", partition_key="t-1")
    invoke(sync_refresh_handler, trigger(request_for("c-1", expires_at)))
    assert manager.calls == []


def test_a_request_held_by_a_live_invocation_is_left_alone(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    key = connection_key("t-1", "zoom", "c-1")
    # Another invocation claimed it and is still within its lease (a slow refresh).
    assert runtime.state_store().claim(request.id, key, int(time.time() * 1000), 60_000).status == "acquired"
    invoke(sync_refresh_handler, trigger(request))
    assert manager.calls == []


def test_a_claim_whose_holder_died_is_taken_over_after_its_lease(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    key = connection_key("t-1", "zoom", "c-1")
    long_ago = int(time.time() * 1000) - 3_600_000
    runtime.state_store().claim(request.id, key, long_ago, 1000)  # lease ran out an hour ago
    invoke(sync_refresh_handler, trigger(request))
    assert len(manager.calls) == 1
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


@pytest.mark.parametrize(("delivery", "expected"), [(2, [REFRESHED]), (1, [])])
def test_a_redelivery_finishes_the_story_of_an_invocation_killed_after_the_refresh(
    app_env, cosmos_container, manager, event_tap, delivery, expected
):
    # The first delivery claimed the request (a lease far longer than a delivery may wait), the
    # manager refreshed the token, and the host was killed before it published. Its redelivery
    # reports `refreshed` at once, without calling again. A first delivery (a duplicate message, not
    # the redelivery) leaves the live claim alone: the redelivery of the killed one will report.
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    key = connection_key("t-1", "zoom", "c-1")
    assert runtime.state_store().claim(request.id, key, int(time.time() * 1000), 600_000).status == "acquired"
    new_expiry = seed_connection(cosmos_container, expires_in=timedelta(hours=1))
    invoke(sync_refresh_handler, trigger(request, delivery))
    assert manager.calls == []
    events = event_tap.drain()
    assert [e.routing_key for e in events] == expected
    if expected:
        assert events[0].body["data"]["expiresAt"] == iso(new_expiry)
        invoke(sync_refresh_handler, trigger(request, delivery + 1))  # and only once
        assert event_tap.drain() == []


def test_an_outcome_whose_publish_failed_is_published_on_redelivery_without_calling_again(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    manager.script = lambda call: Answer(200, {})
    publisher = runtime.publisher()
    real_publish = publisher.publish

    def broken_publish(events):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(publisher, "publish", broken_publish)
    with pytest.raises(ConnectionError):
        invoke(sync_refresh_handler, trigger(request, 1))
    monkeypatch.setattr(publisher, "publish", real_publish)
    invoke(sync_refresh_handler, trigger(request, 2))
    assert len(manager.calls) == 1
    [refreshed] = event_tap.of_type(REFRESHED)
    assert refreshed["data"]["connectionId"] == "c-1"


def test_refresh_requests_of_one_connection_share_a_service_bus_session():
    a = request_for("c-1", utc_now())
    b = request_for("c-1", utc_now() + timedelta(hours=1))
    other = request_for("c-2", utc_now())
    assert session_id(a) == session_id(b) != session_id(other)
    assert len(session_id(a)) <= 128
    assert session_id(check_event()) is None


# No refresh storm --------------------------------------------------------------------------------


def requested_ids(event_tap):
    return sorted(e["data"]["connectionId"] for e in event_tap.of_type(REFRESH_REQUESTED))


def test_a_permanent_failure_is_not_requested_again_until_the_document_changes(
    app_env, cosmos_container, manager, event_tap
):
    seed_connection(cosmos_container, "broken")
    seed_connection(cosmos_container, "fine")
    manager.script = lambda call: (
        Answer(400, {"error": "invalid_grant"}) if call.connection_id == "broken" else Answer(200, {})
    )

    invoke(manager_check_handler, trigger(check_event()))
    requests = [e for e in event_tap.drain() if e.routing_key == REFRESH_REQUESTED]
    assert sorted(e.body["data"]["connectionId"] for e in requests) == ["broken", "fine"]
    for captured in requests:
        invoke(sync_refresh_handler, trigger(make_event_from(captured.body)))
    event_tap.drain()

    invoke(manager_check_handler, trigger(check_event()))  # next run: "broken" unchanged -> suppressed
    assert requested_ids(event_tap) == ["fine"]

    time.sleep(1.1)  # Cosmos _ts has one-second resolution
    seed_connection(cosmos_container, "broken")  # the user reconnected: the document changed
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == ["broken", "fine"]


def test_the_cooldown_lets_an_unchanged_failure_be_tried_again(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_FAILURE_COOLDOWN_MS", "1000")
    runtime.reset()
    expires_at = seed_connection(cosmos_container, "broken")
    manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    invoke(sync_refresh_handler, trigger(request_for("broken", expires_at)))
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == []
    time.sleep(1.1)
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == ["broken"]


def make_event_from(body):
    from shared.events import CloudEvent

    return CloudEvent.model_validate(body)


# Tokens without expiry ---------------------------------------------------------------------------


def seed_without_expiry(container, connection_id, refresh_token=True):
    oauth = {"accessToken": "at"} | ({"refreshToken": "rt"} if refresh_token else {})
    container.upsert_item({"id": connection_id, "tenantId": "t-1", "integrationId": "zoom", "oauth": oauth})


def test_tokens_without_expiry_are_ignored_by_default(app_env, cosmos_container, event_tap):
    seed_without_expiry(cosmos_container, "no-expiry")
    time.sleep(1.1)
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == []


def test_tokens_without_expiry_are_refreshed_when_their_document_is_older_than_max_age(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_MAX_AGE_MS", "1000")
    runtime.reset()
    seed_without_expiry(cosmos_container, "no-expiry")
    seed_without_expiry(cosmos_container, "no-refresh-token", refresh_token=False)
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == []  # younger than the max age
    time.sleep(2.1)
    invoke(manager_check_handler, trigger(check_event()))
    [request] = event_tap.of_type(REFRESH_REQUESTED)
    assert request["data"]["connectionId"] == "no-expiry"
    assert "expiresAt" not in request["data"]
    invoke(sync_refresh_handler, trigger(make_event_from(request)))
    assert [call.connection_id for call in manager.calls] == ["no-expiry"]
    assert [json.dumps(e["data"]["connectionId"]) for e in event_tap.of_type(REFRESHED)] == ['"no-expiry"']
