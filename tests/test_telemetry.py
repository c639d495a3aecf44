"""Log records carry the fields Application Insights queries (customDimensions). What the real worker's
Azure Monitor exporter sends is in tests/test_real_worker.py."""

import logging
import threading
from datetime import timedelta
from types import SimpleNamespace

import sync_refresh_handler
from shared import telemetry
from shared.events import utc_now
from tests.helpers import refresh_request, trigger

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
    assert telemetry.current_fields() == {}


def test_concurrent_invocations_keep_their_own_fields(caplog):
    telemetry.install()
    seen = {}
    barrier = threading.Barrier(2)

    def invocation(name):
        with telemetry.invocation(SimpleNamespace(invocation_id=name), "f"):
            telemetry.bind(connectionId=f"conn-{name}")
            barrier.wait()
            logging.getLogger("shared.test").warning("working")
            seen[name] = telemetry.current_fields()

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=invocation, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert seen["a"]["connectionId"] == "conn-a" and seen["b"]["connectionId"] == "conn-b"
    assert sorted((r.invocationId, r.connectionId) for r in caplog.records) == [("a", "conn-a"), ("b", "conn-b")]
