"""Connection documents seeded into Cosmos (as the platform stores them) and the refresh requests for
them, for the tests of several layers."""

from datetime import UTC, datetime, timedelta

import pytest

import sync_refresh_handler
from localdev.stand_in_manager import Answer
from shared.errors import RefreshRetryLaterError
from shared.events import REFRESH_FAILED
from shared.times import utc_now
from tests.support.helpers import invoke, iso, refresh_request, trigger


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


def deliver_until_the_last_delivery_reports(request, event_tap):
    """Deliveries of a failing request: each but the last raises for redelivery and reports nothing
    (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3 in the test settings); the last one reports."""
    for delivery in (1, 2):
        with pytest.raises(RefreshRetryLaterError):
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


def seed_without_expiry(container, connection_id, refresh_token=True):
    oauth = {"accessToken": "at"} | ({"refreshToken": "rt"} if refresh_token else {})
    container.upsert_item({"id": connection_id, "tenantId": "t-1", "integrationId": "zoom", "oauth": oauth})


def stored_connection_request(container, connection_id="conn-1"):
    """A refresh-requested event for a connection that exists in Cosmos with that expiry."""
    now = utc_now()
    expires_at = now + timedelta(minutes=5)
    container.upsert_item(
        {
            "id": connection_id,
            "tenantId": "t-9",
            "integrationId": "github",
            "status": "active",
            "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(expires_at)},
        }
    )
    return refresh_request(connection_id, "github", "t-9", expires_at)


def upsert_connection(
    container, connection_id, *, tenant="t-1", integration="salesforce", status="active", expires_in_h=48.0
):
    """A connection (due in `expires_in_h` hours: by default not due); returns the stored document."""
    document = {
        "id": connection_id,
        "tenantId": tenant,
        "integrationId": integration,
        "status": status,
        "oauth": {
            "accessToken": "at-secret",
            "refreshToken": "rt-secret",
            "expiresAt": iso(datetime.now(UTC) + timedelta(hours=expires_in_h)),
        },
    }
    return container.upsert_item(document)


def seed_expiring(container, connection_id: str, expires_at: datetime, integration_id: str = "salesforce") -> dict:
    """An active connection of tenant t-1 whose token expires at `expires_at`; returns the stored document."""
    return container.upsert_item(
        {
            "id": connection_id,
            "tenantId": "t-1",
            "integrationId": integration_id,
            "status": "active",
            "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(expires_at)},
        }
    )
