"""Failure handling that loses nothing and refreshes nothing twice: retries across deliveries, claims,
cooldown, tokens without expiry. Real Cosmos-compatible server, RabbitMQ and the stand-in manager (the
retries inside one invocation, without services: tests/unit/test_failure_handling.py)."""

import json
import time
from datetime import timedelta

import pytest

import manager_check_handler
import sync_refresh_handler
from localdev.stand_in_manager import Answer
from shared import runtime
from shared.errors import RefreshRetryLaterError
from shared.events import REFRESH_REQUESTED, REFRESHED
from shared.ids import connection_key
from shared.times import utc_now
from tests.support.documents import (
    a_request_that_failed_transiently,
    request_for,
    seed_connection,
    seed_without_expiry,
)
from tests.support.helpers import check_event, invoke, iso, trigger

# Across deliveries -------------------------------------------------------------------------------


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
    with pytest.raises(RefreshRetryLaterError):
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
    manager.script = lambda call: Answer(
        200
    )  # a new expiry, but the document keeps its own: only the claim stops a 2nd call
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
    assert runtime.state_store().claims.acquire(request.id, key, int(time.time() * 1000), 60_000).status == "acquired"
    invoke(sync_refresh_handler, trigger(request))
    assert manager.calls == []


def test_a_claim_whose_holder_died_is_taken_over_after_its_lease(app_env, cosmos_container, manager, event_tap):
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    key = connection_key("t-1", "zoom", "c-1")
    long_ago = int(time.time() * 1000) - 3_600_000
    runtime.state_store().claims.acquire(request.id, key, long_ago, 1000)  # lease ran out an hour ago
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
    assert runtime.state_store().claims.acquire(request.id, key, int(time.time() * 1000), 600_000).status == "acquired"
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
    manager.script = lambda call: Answer(200)
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


# No refresh storm --------------------------------------------------------------------------------


def requested_ids(event_tap):
    return sorted(e["data"]["connectionId"] for e in event_tap.of_type(REFRESH_REQUESTED))


def test_a_permanent_failure_is_not_requested_again_until_the_token_changes(
    app_env, cosmos_container, manager, event_tap
):
    seed_connection(cosmos_container, "broken")
    seed_connection(cosmos_container, "fine")
    manager.script = lambda call: (
        Answer(400, {"error": "invalid_grant"}) if call.connection_id == "broken" else Answer(200)
    )

    invoke(manager_check_handler, trigger(check_event()))
    requests = [e for e in event_tap.drain() if e.routing_key == REFRESH_REQUESTED]
    assert sorted(e.body["data"]["connectionId"] for e in requests) == ["broken", "fine"]
    for captured in requests:
        invoke(sync_refresh_handler, trigger(make_event_from(captured.body)))
    event_tap.drain()

    invoke(manager_check_handler, trigger(check_event()))  # next run: "broken" unchanged -> suppressed
    assert requested_ids(event_tap) == ["fine"]

    time.sleep(1.1)  # seed_connection's expiries have one-second resolution
    seed_connection(cosmos_container, "broken")  # the user reconnected: a new token (a new expiresAt)
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == ["broken", "fine"]


def test_failure_details_the_manager_writes_onto_the_document_do_not_lift_the_suppression(
    app_env, cosmos_container, manager, event_tap
):
    # Was: suppression was keyed to the document's _ts as read before the call; a manager that records the failure on
    # the connection (as Nango's setRefreshFailure does) changed _ts, and every check called it again.
    expires_at = seed_connection(cosmos_container, "broken")

    def fail_and_record_it(call):
        document = cosmos_container.read_item("broken", partition_key="t-1")
        cosmos_container.upsert_item(document | {"refreshFailure": {"code": "invalid_grant", "count": 1}})
        return Answer(400, {"error": "invalid_grant"})

    manager.script = fail_and_record_it
    invoke(sync_refresh_handler, trigger(request_for("broken", expires_at)))
    time.sleep(1.1)  # a later write would show in _ts
    document = cosmos_container.read_item("broken", partition_key="t-1")
    cosmos_container.upsert_item(document | {"refreshFailure": {"code": "invalid_grant", "count": 2}})
    invoke(manager_check_handler, trigger(check_event()))
    assert requested_ids(event_tap) == []
    assert len(manager.calls) == 1


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
