"""Log records carry the fields Application Insights queries (customDimensions), for a whole invocation of each
function against the real services. Concurrent invocations: tests/unit/test_telemetry.py; what the real
worker's Azure Monitor exporter sends: tests/integration/test_real_worker.py."""

import logging
from datetime import timedelta
from types import SimpleNamespace

from azure.functions.timer import TimerRequest

import check_expiring_timer
import manager_check_handler
import sync_refresh_handler
from shared.times import utc_now
from tests.support.helpers import check_event, iso, refresh_request, telemetry_fields, trigger

FIELDS = ("invocationId", "functionName", "connectionId", "integrationId", "tenantId")


def app_records(caplog, module: str) -> list[logging.LogRecord]:
    """The app's log records (every shared.* logger), after checking that `module` logged some of them."""
    records = [record for record in caplog.records if record.name.startswith("shared.")]
    assert any(record.name == module for record in records), [record.name for record in records]
    return records


def ids_of(record: logging.LogRecord) -> dict[str, str | None]:
    return {name: getattr(record, name, None) for name in FIELDS}


def test_every_record_of_a_refresh_invocation_carries_the_ids(app_env, cosmos_container, caplog):
    expires_at = (utc_now() + timedelta(minutes=5)).replace(microsecond=0)
    cosmos_container.upsert_item(
        {
            "id": "c-7",
            "tenantId": "t-7",
            "integrationId": "asana",
            "status": "active",
            "oauth": {"expiresAt": expires_at.isoformat()},
        }
    )
    event = refresh_request("c-7", "asana", "t-7", expires_at)
    with caplog.at_level(logging.INFO):
        sync_refresh_handler.main(trigger(event), context=SimpleNamespace(invocation_id="inv-123"))
    records = [r for r in caplog.records if r.name.startswith("shared.token_refresh")]
    assert any("OAuth tokens refreshed successfully" in r.getMessage() for r in records)
    for record in records:
        assert ids_of(record) == {
            "invocationId": "inv-123",
            "functionName": "sync_refresh_handler",
            "connectionId": "c-7",
            "integrationId": "asana",
            "tenantId": "t-7",
        }
    # Outside the invocation nothing is attached any more.
    assert telemetry_fields() == {}


def test_every_record_of_a_timer_invocation_carries_the_invocations_ids(app_env, event_tap, caplog):
    with caplog.at_level(logging.INFO):
        check_expiring_timer.main(TimerRequest(past_due=True), context=SimpleNamespace(invocation_id="inv-timer"))
    records = app_records(caplog, "shared.check_timer")
    assert any("Published check-expiring event" in record.getMessage() for record in records)
    for record in records:  # a tick is about no connection: no connection's ids
        assert ids_of(record) == dict.fromkeys(FIELDS) | {
            "invocationId": "inv-timer",
            "functionName": "check_expiring_timer",
        }, record.getMessage()
    assert telemetry_fields() == {}


def test_every_record_of_a_check_invocation_carries_the_invocations_ids(app_env, cosmos_container, event_tap, caplog):
    cosmos_container.upsert_item(
        {
            "id": "c-8",
            "tenantId": "t-8",
            "integrationId": "asana",
            "status": "active",
            "oauth": {"refreshToken": "rt", "expiresAt": iso(utc_now() + timedelta(minutes=5))},
        }
    )
    with caplog.at_level(logging.INFO):
        manager_check_handler.main(
            trigger(check_event(timedelta(minutes=65))), context=SimpleNamespace(invocation_id="inv-check")
        )
    records = app_records(caplog, "shared.expiring_check")
    assert any("Found OAuth connections with expiring tokens (count=1" in record.getMessage() for record in records)
    for record in records:  # a check covers many connections: none's ids on its records
        assert ids_of(record) == dict.fromkeys(FIELDS) | {
            "invocationId": "inv-check",
            "functionName": "manager_check_handler",
        }, record.getMessage()
    assert telemetry_fields() == {}
