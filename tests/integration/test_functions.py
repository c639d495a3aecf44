"""Each function's own main(), invoked with real azure.functions trigger objects, against real
RabbitMQ and the Cosmos-compatible server, and the stand-in integration-manager."""

import logging
from datetime import UTC, datetime, timedelta

import pytest
from azure.functions.timer import TimerRequest

import check_expiring_timer
import manager_check_handler
import sync_refresh_handler
from localdev.stand_in_manager import Answer
from shared.errors import InvalidEventError
from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED
from shared.times import parse_time, utc_now
from tests.support.documents import stored_connection_request
from tests.support.helpers import check_event, invoke, iso, trigger

# Timer -------------------------------------------------------------------------------------------


def test_timer_publishes_check_expiring_with_the_threshold(app_env, event_tap, caplog):
    with caplog.at_level(logging.INFO):
        before = utc_now()
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    [event] = event_tap.of_type(CHECK_EXPIRING)
    data = event["data"]
    timestamp, threshold = parse_time(data["timestamp"]), parse_time(data["thresholdTime"])
    assert before - timedelta(seconds=1) <= timestamp <= utc_now()
    assert threshold - timestamp == timedelta(milliseconds=3_900_000)
    assert "Token refresh worker initialized and started" in caplog.text
    assert "Published check-expiring event, integration-manager will handle token refresh detection" in caplog.text


def test_timer_runs_once_per_interval_and_announces_once_per_process(app_env, event_tap, caplog):
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            invoke(check_expiring_timer, TimerRequest(past_due=False))
    assert len(event_tap.of_type(CHECK_EXPIRING)) == 1
    assert caplog.text.count("Token refresh worker initialized and started") == 1


def test_timer_cadence_follows_the_interval_setting(app_env, monkeypatch):
    from shared.check_timer import cadence

    start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    due = [
        cadence.claim_run(start + timedelta(minutes=m, milliseconds=(-3 if m % 2 else 4)), 10 * 60_000)
        for m in range(0, 31)
    ]
    # A 10-minute interval on a one-minute tick runs at minutes 0, 10, 20 and 30 despite tick jitter.
    assert [m for m, ran in enumerate(due) if ran] == [0, 10, 20, 30]


def test_timer_publishes_nothing_when_disabled(app_env, monkeypatch, event_tap, caplog):
    monkeypatch.setenv("TOKEN_REFRESH_ENABLED", "false")
    with caplog.at_level(logging.INFO):
        invoke(check_expiring_timer, TimerRequest(past_due=False))
        invoke(check_expiring_timer, TimerRequest(past_due=True))
    assert event_tap.drain() == []
    assert caplog.text.count("Token refresh is disabled") == 1
    assert "initialized and started" not in caplog.text


# Manager check handler ---------------------------------------------------------------------------


def seed(container, count_due=3, count_later=2):
    now = utc_now()
    for n in range(count_due):
        container.upsert_item(
            {
                "id": f"due-{n}",
                "tenantId": f"t-{n % 2}",
                "integrationId": "google",
                "status": "active",
                "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(now + timedelta(minutes=n))},
            }
        )
    for n in range(count_later):
        container.upsert_item(
            {
                "id": f"later-{n}",
                "tenantId": "t-0",
                "integrationId": "google",
                "status": "active",
                "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(now + timedelta(days=2))},
            }
        )


CHECK_THRESHOLD = timedelta(minutes=65)


def test_check_handler_requests_one_refresh_per_expiring_connection(app_env, cosmos_container, event_tap, caplog):
    seed(cosmos_container)
    with caplog.at_level(logging.INFO):
        invoke(manager_check_handler, trigger(check_event(CHECK_THRESHOLD)))
    requests_ = event_tap.of_type(REFRESH_REQUESTED)
    assert sorted(event["data"]["connectionId"] for event in requests_) == ["due-0", "due-1", "due-2"]
    assert "Token check-expiring event received" in caplog.text
    assert "Found OAuth connections with expiring tokens (count=3" in caplog.text
    for event in requests_:
        assert set(event["data"]) == {"connectionId", "integrationId", "tenantId", "expiresAt", "requestedAt"}


def test_check_handler_gives_the_same_ids_for_the_same_connection_and_expiry(app_env, cosmos_container, event_tap):
    seed(cosmos_container)
    invoke(manager_check_handler, trigger(check_event(CHECK_THRESHOLD)))
    first = {e["data"]["connectionId"]: e["id"] for e in event_tap.of_type(REFRESH_REQUESTED)}
    invoke(manager_check_handler, trigger(check_event(CHECK_THRESHOLD)))
    second = {e["data"]["connectionId"]: e["id"] for e in event_tap.of_type(REFRESH_REQUESTED)}
    assert first == second


@pytest.mark.parametrize("body", [b"{not json", b'{"specversion":"1.0"}', b"[]"])
def test_check_handler_rejects_malformed_messages_with_a_clear_error(app_env, event_tap, body):
    with pytest.raises(InvalidEventError):
        invoke(manager_check_handler, trigger(body))
    assert event_tap.drain() == []


# Sync refresh handler ----------------------------------------------------------------------------


def test_refresh_handler_calls_the_manager_and_publishes_refreshed(
    app_env, cosmos_container, manager, event_tap, caplog
):
    with caplog.at_level(logging.INFO):
        invoke(sync_refresh_handler, trigger(stored_connection_request(cosmos_container)))
    [call] = manager.calls
    assert call.raw_path == "/api/v1/integrations/github/connections/conn-1/refresh"
    assert call.headers["Authorization"] == f"Bearer {app_env['INTEGRATION_MANAGER_TOKEN']}"
    [event] = event_tap.of_type(REFRESHED)
    assert {k: event["data"][k] for k in ("connectionId", "integrationId", "tenantId")} == {
        "connectionId": "conn-1",
        "integrationId": "github",
        "tenantId": "t-9",
    }
    assert "expiresAt" in event["data"] and "refreshedAt" in event["data"]
    assert "Refreshing OAuth tokens for connection" in caplog.text
    assert "OAuth tokens refreshed successfully" in caplog.text


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (400, {"error": "invalid_grant"}, False),
        (503, None, True),
        (429, None, True),
    ],
)
def test_refresh_handler_publishes_failed_with_error_retryable_and_attempts(
    app_env, cosmos_container, manager, event_tap, status, body, retryable
):
    manager.script = lambda call: Answer(status, body)
    # The last delivery (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3 in the test settings) reports any failure.
    invoke(sync_refresh_handler, trigger(stored_connection_request(cosmos_container), delivery_count=3))
    [event] = event_tap.of_type(REFRESH_FAILED)
    data = event["data"]
    assert data["error"]["httpStatus"] == status
    assert data["retryable"] is retryable
    assert data["attempts"] == (2 if retryable else 1)  # transient: INTEGRATION_MANAGER_MAX_ATTEMPTS=2
    assert len(manager.calls) == data["attempts"]
    assert event_tap.of_type(REFRESHED) == []


def test_refresh_handler_rejects_an_event_of_another_type(app_env, manager):
    with pytest.raises(InvalidEventError, match=r"expected 'integration\.token\.refresh-requested'"):
        invoke(sync_refresh_handler, trigger(check_event(CHECK_THRESHOLD)))
    assert manager.calls == []
