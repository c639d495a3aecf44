"""Selection step: on `integration.token.check-expiring`, find the connections whose token expires
by `thresholdTime` and publish one `integration.token.refresh-requested` per connection.

Streams page by page: each Cosmos page is validated and published as one batch before the next
page is read, so memory does not grow with the number of expiring connections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from shared import runtime
from shared.connection_store import ConnectionStore, ExpiringConnection
from shared.events import (
    CHECK_EXPIRING,
    CheckExpiringData,
    CloudEvent,
    RefreshRequestedData,
    format_time,
    make_event,
    parse_event,
    refresh_request_id,
    utc_now,
)
from shared.messaging import EventPublisher
from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class CheckSummary:
    found: int = 0
    published: int = 0
    invalid: int = 0
    pages: int = 0
    duration_ms: int = 0


def refresh_requested_event(connection: ExpiringConnection, requested_at: datetime) -> CloudEvent:
    data = RefreshRequestedData(
        connection_id=connection.connection_id,
        integration_id=connection.integration_id,
        tenant_id=connection.tenant_id,
        expires_at=connection.expires_at,
        requested_at=requested_at,
    )
    return make_event(data, event_id=refresh_request_id(data, connection.expires_at), time=requested_at)


def find_expiring_connections(
    store: ConnectionStore, threshold: datetime, settings: Settings
) -> Iterator[ExpiringConnection]:
    """Every connection due for refresh by `threshold` (used by `check --dry-run`)."""
    for page in store.expiring_connection_pages(threshold, settings.skip_statuses):
        yield from page.connections


def request_refresh_for_expiring_connections(
    check: CheckExpiringData, store: ConnectionStore, publisher: EventPublisher, settings: Settings
) -> CheckSummary:
    started = time.monotonic()
    summary = CheckSummary()
    for page in store.expiring_connection_pages(check.threshold_time, settings.skip_statuses):
        summary.pages += 1
        summary.invalid += page.invalid
        if not page.connections:
            continue
        summary.found += len(page.connections)
        logger.info(
            "Found OAuth connections with expiring tokens (count=%d page=%d thresholdTime=%s)",
            len(page.connections),
            summary.pages,
            format_time(check.threshold_time),
        )
        requested_at = utc_now()
        summary.published += publisher.publish(
            refresh_requested_event(connection, requested_at) for connection in page.connections
        )
    if summary.found == 0:
        logger.info("Found OAuth connections with expiring tokens (count=0)")
    summary.duration_ms = int((time.monotonic() - started) * 1000)
    logger.info(
        "Check-expiring run finished (found=%d published=%d invalid=%d pages=%d durationMs=%d)",
        summary.found,
        summary.published,
        summary.invalid,
        summary.pages,
        summary.duration_ms,
    )
    return summary


def handle_check_expiring_message(body: bytes) -> CheckSummary:
    """The manager_check_handler function: parse the trigger message, run the check."""
    logger.info("Token check-expiring event received")
    envelope, check = parse_event(body, CHECK_EXPIRING)
    logger.info("Checking for tokens expiring by %s (eventId=%s)", format_time(check.threshold_time), envelope.id)
    return request_refresh_for_expiring_connections(
        check, runtime.connection_store(), runtime.publisher(), runtime.settings()
    )
