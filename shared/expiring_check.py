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
    parse_trigger_message,
    refresh_request_id,
    utc_now,
)
from shared.messaging import EventPublisher
from shared.settings import Settings
from shared.state_store import StateStore, connection_key

logger = logging.getLogger(__name__)


@dataclass
class CheckSummary:
    found: int = 0
    published: int = 0
    invalid: int = 0
    suppressed: int = 0
    pages: int = 0
    duration_ms: int = 0
    continued: bool = False


def refresh_requested_event(connection: ExpiringConnection, requested_at: datetime) -> CloudEvent:
    data = RefreshRequestedData(
        connection_id=connection.connection_id,
        integration_id=connection.integration_id,
        tenant_id=connection.tenant_id,
        expires_at=connection.expires_at,
        requested_at=requested_at,
    )
    event_id = refresh_request_id(data, connection.expires_at, connection.document_ts)
    return make_event(data, event_id=event_id, time=requested_at)


def find_expiring_connections(
    store: ConnectionStore, states: StateStore, threshold: datetime, settings: Settings
) -> Iterator[ExpiringConnection]:
    """Every connection a check would request a refresh for now (used by `check --dry-run`)."""
    for page in store.expiring_connection_pages(threshold, settings.skip_statuses):
        yield from without_recent_permanent_failures(page.connections, states, settings.failure_cooldown_ms)[0]


def without_recent_permanent_failures(
    connections: list[ExpiringConnection], states: StateStore, cooldown_ms: int
) -> tuple[list[ExpiringConnection], int]:
    """Drop connections whose refresh failed permanently for this same document version within the
    cooldown: requesting them again would fail again (no refresh storm)."""
    keys = {connection_key(c.tenant_id, c.integration_id, c.connection_id): c for c in connections}
    suppressed = states.suppressed_keys(
        {key: c.document_ts for key, c in keys.items()}, int(time.time() * 1000), cooldown_ms
    )
    for key, record in suppressed.items():
        connection = keys[key]
        logger.info(
            "Not requesting refresh for connection %r (%s): it failed permanently (%s) and its document "
            "has not changed since",
            connection.connection_id,
            connection.integration_id,
            record.get("code"),
        )
    return [c for key, c in keys.items() if key not in suppressed], len(suppressed)


def request_refresh_for_expiring_connections(
    check: CheckExpiringData,
    *,
    store: ConnectionStore,
    states: StateStore,
    publisher: EventPublisher,
    settings: Settings,
) -> CheckSummary:
    started = time.monotonic()
    summary = CheckSummary()
    pages = store.expiring_connection_pages(
        check.threshold_time, settings.skip_statuses, continuation=check.continuation, now=check.timestamp
    )
    for page in pages:
        summary.pages += 1
        summary.invalid += page.invalid
        connections, suppressed = without_recent_permanent_failures(
            page.connections, states, settings.failure_cooldown_ms
        )
        summary.suppressed += suppressed
        if not connections:
            continue
        summary.found += len(connections)
        logger.info(
            "Found OAuth connections with expiring tokens (count=%d page=%d thresholdTime=%s)",
            len(connections),
            summary.pages,
            format_time(check.threshold_time),
        )
        requested_at = utc_now()
        summary.published += publisher.publish(
            refresh_requested_event(connection, requested_at) for connection in connections
        )
        if page.continuation and (time.monotonic() - started) * 1000 >= settings.check_time_budget_ms:
            # Hand the rest of the scan to a follow-up invocation before the function times out.
            follow_up = make_event(check.model_copy(update={"continuation": page.continuation}))
            publisher.publish([follow_up])
            summary.continued = True
            logger.info(
                "Check-expiring time budget reached after %d page(s); a follow-up check continues the scan "
                "(eventId=%s)",
                summary.pages,
                follow_up.id,
            )
            break
    if summary.found == 0 and not summary.continued:
        logger.info("Found OAuth connections with expiring tokens (count=0)")
    summary.duration_ms = int((time.monotonic() - started) * 1000)
    logger.info(
        "Check-expiring run finished (found=%d published=%d invalid=%d suppressed=%d pages=%d durationMs=%d "
        "continued=%s)",
        summary.found,
        summary.published,
        summary.invalid,
        summary.suppressed,
        summary.pages,
        summary.duration_ms,
        summary.continued,
    )
    return summary


def handle_check_expiring_message(
    body: bytes, delivery_count: int | None = None, message_id: str | None = None
) -> CheckSummary:
    """The manager_check_handler function: parse the trigger message, run the check."""
    logger.info("Token check-expiring event received")
    envelope, check = parse_trigger_message(body, CHECK_EXPIRING, message_id, max(1, delivery_count or 1))
    logger.info("Checking for tokens expiring by %s (eventId=%s)", format_time(check.threshold_time), envelope.id)
    return request_refresh_for_expiring_connections(
        check,
        store=runtime.connection_store(),
        states=runtime.state_store(),
        publisher=runtime.publisher(),
        settings=runtime.settings(),
    )
