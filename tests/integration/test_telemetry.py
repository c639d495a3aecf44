"""Log records carry the fields Application Insights queries (customDimensions), for a whole refresh
invocation against the real services. Concurrent invocations: tests/unit/test_telemetry.py; what the real
worker's Azure Monitor exporter sends: tests/integration/test_real_worker.py."""

import logging
from datetime import timedelta
from types import SimpleNamespace

import sync_refresh_handler
from shared.times import utc_now
from tests.support.helpers import refresh_request, telemetry_fields, trigger

FIELDS = ("invocationId", "functionName", "connectionId", "integrationId", "tenantId")


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
        assert {name: getattr(record, name) for name in FIELDS} == {
            "invocationId": "inv-123",
            "functionName": "sync_refresh_handler",
            "connectionId": "c-7",
            "integrationId": "asana",
            "tenantId": "t-7",
        }
    # Outside the invocation nothing is attached any more.
    assert telemetry_fields() == {}
