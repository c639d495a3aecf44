"""The check does not trust what it is handed: a thresholdTime past what the settings allow is
capped, a token whose lifetime is shorter than the threshold is not refreshed at every check (a
refresh loop), and a long run of pages with nothing to publish still hands off before the function
times out. Against real RabbitMQ and the Cosmos-compatible server."""

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import manager_check_handler
import sync_refresh_handler
from shared import runtime
from shared.events import CHECK_EXPIRING, REFRESH_REQUESTED, CheckExpiringData, CloudEvent, make_event
from shared.ids import connection_key
from shared.state_store import StateStore
from tests.support.documents import seed_expiring
from tests.support.helpers import invoke, refresh_request, trigger


def check(timestamp: datetime, threshold_time: datetime) -> CloudEvent:
    return make_event(CheckExpiringData(timestamp=timestamp, threshold_time=threshold_time))


def requested_ids(captured) -> list[str]:
    return sorted(e.body["data"]["connectionId"] for e in captured if e.routing_key == REFRESH_REQUESTED)


def test_a_threshold_time_past_what_the_settings_allow_is_capped(app_env, cosmos_container, event_tap, caplog):
    now = datetime.now(UTC)
    seed_expiring(cosmos_container, "due-in-30-min", now + timedelta(minutes=30))
    seed_expiring(cosmos_container, "valid-for-30-days", now + timedelta(days=30))
    with caplog.at_level(logging.WARNING):
        invoke(manager_check_handler, trigger(check(now, datetime(2999, 1, 1, tzinfo=UTC))))
    assert requested_ids(event_tap.drain()) == ["due-in-30-min"]
    assert "thresholdTime 2999-01-01T00:00:00.000Z is later than the settings allow" in caplog.text


def test_a_timestamp_in_the_future_does_not_widen_the_threshold(app_env, cosmos_container, event_tap):
    now = datetime.now(UTC)
    seed_expiring(cosmos_container, "due-in-30-min", now + timedelta(minutes=30))
    seed_expiring(cosmos_container, "valid-for-30-days", now + timedelta(days=30))
    future = datetime(2999, 1, 1, tzinfo=UTC)
    invoke(manager_check_handler, trigger(check(future, future + timedelta(hours=1))))
    assert requested_ids(event_tap.drain()) == ["due-in-30-min"]


def test_a_threshold_time_within_the_settings_is_kept(app_env, cosmos_container, event_tap):
    now = datetime.now(UTC)
    seed_expiring(cosmos_container, "due-in-30-min", now + timedelta(minutes=30))
    seed_expiring(cosmos_container, "due-in-64-min", now + timedelta(minutes=64))  # threshold 65 min (app_env)
    invoke(manager_check_handler, trigger(check(now, now + timedelta(minutes=65))))
    assert requested_ids(event_tap.drain()) == ["due-in-30-min", "due-in-64-min"]


def test_tokens_shorter_lived_than_the_threshold_are_not_refreshed_at_every_check(
    app_env, cosmos_container, manager, event_tap, monkeypatch, caplog
):
    # The settings `make services-up` writes: a check every 60 s, a 65-minute threshold; 1-hour tokens.
    monkeypatch.setenv("TOKEN_REFRESH_INTERVAL_MS", "60000")
    runtime.reset()
    now = datetime.now(UTC)
    for n in range(5):  # written just now, due in 20-24 min: never refreshed by this app, so requested
        seed_expiring(cosmos_container, f"conn-{n}", now + timedelta(minutes=20 + n))
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=1)
    summaries = []
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # three checks in a row, each followed by its refreshes
            started = datetime.now(UTC)
            invoke(manager_check_handler, trigger(check(started, started + timedelta(minutes=65))))
            for captured in event_tap.drain():
                if captured.routing_key == REFRESH_REQUESTED:
                    invoke(sync_refresh_handler, trigger(CloudEvent.model_validate(captured.body)))
            summaries.append([r.getMessage() for r in caplog.records if "run finished" in r.getMessage()][-1])
    assert Counter(call.connection_id for call in manager.calls) == {f"conn-{n}": 1 for n in range(5)}
    assert "found=5 " in summaries[0]
    assert all("found=0 " in s and "deferred=5 " in s for s in summaries[1:]), summaries
    warnings = [r.getMessage() for r in caplog.records if "longer than the lifetime of 5 token(s)" in r.getMessage()]
    assert len(warnings) == 2  # once per check that deferred them
    assert "median 3600" in warnings[0] or "median 359" in warnings[0], warnings[0]


def test_a_short_lived_token_is_refreshed_once_it_expires_before_the_next_check(app_env, cosmos_container, event_tap):
    # 1-minute tokens written just now, a 60-minute interval: the next check would come too late.
    now = datetime.now(UTC)
    seed_expiring(cosmos_container, "one-minute-token", now + timedelta(minutes=1))
    invoke(manager_check_handler, trigger(check(now, now + timedelta(minutes=65))))
    assert requested_ids(event_tap.drain()) == ["one-minute-token"]


def test_the_time_budget_is_checked_after_pages_with_nothing_to_publish(
    app_env, cosmos_container, event_tap, monkeypatch, caplog
):
    # Every connection failed permanently (nothing to publish): one page, then the budget (1 ms) is
    # spent and a follow-up check takes over the rest of the scan.
    monkeypatch.setenv("TOKEN_REFRESH_PAGE_SIZE", "1")
    monkeypatch.setenv("TOKEN_REFRESH_CHECK_TIME_BUDGET_MS", "1")
    runtime.reset()
    states = runtime.state_store()
    assert isinstance(states, StateStore)
    now = datetime.now(UTC)
    for n in range(4):
        expires_at = now + timedelta(minutes=10)
        seed_expiring(cosmos_container, f"broken-{n}", expires_at)
        states.record_permanent_failure(
            connection_key("t-1", "salesforce", f"broken-{n}"),
            refresh_request(f"broken-{n}", "salesforce", "t-1", expires_at).id,
            "invalid_grant",
            int(now.timestamp() * 1000),
            0,
        )
    with caplog.at_level(logging.INFO):
        invoke(manager_check_handler, trigger(check(now, now + timedelta(minutes=65))))
    captured = event_tap.drain()
    assert requested_ids(captured) == []
    [follow_up] = [e.body for e in captured if e.routing_key == CHECK_EXPIRING]
    assert follow_up["data"]["continuation"]
    assert "suppressed=1 " in caplog.text and "continued=True" in caplog.text
