"""Refresh and notification steps: on `integration.token.refresh-requested`, ask integration-manager
to refresh the connection, then publish `integration.token.refreshed` or `.refresh.failed`."""

from __future__ import annotations

import logging

from shared import runtime
from shared.events import (
    REFRESH_REQUESTED,
    CloudEvent,
    RefreshedData,
    RefreshError,
    RefreshFailedData,
    RefreshRequestedData,
    make_event,
    parse_event,
    utc_now,
)
from shared.manager_client import IntegrationManagerClient, RefreshOutcome
from shared.messaging import EventPublisher

logger = logging.getLogger(__name__)


def outcome_event(request: RefreshRequestedData, outcome: RefreshOutcome, attempts: int) -> CloudEvent:
    ids = {
        "connection_id": request.connection_id,
        "integration_id": request.integration_id,
        "tenant_id": request.tenant_id,
    }
    now = utc_now()
    if outcome.succeeded:
        return make_event(RefreshedData(**ids, refreshed_at=now, expires_at=outcome.expires_at), time=now)
    error = RefreshError(
        code=outcome.error_code or "refresh_failed",
        message=outcome.error_message or "refresh failed",
        http_status=outcome.http_status,
    )
    return make_event(
        RefreshFailedData(**ids, failed_at=now, error=error, retryable=outcome.retryable, attempts=attempts),
        time=now,
    )


def refresh_connection_token(
    request: RefreshRequestedData,
    manager: IntegrationManagerClient,
    publisher: EventPublisher,
    attempts: int = 1,
) -> CloudEvent:
    ids = (
        f"connectionId={request.connection_id!r} integrationId={request.integration_id!r} "
        f"tenantId={request.tenant_id!r}"
    )
    logger.info("Refreshing OAuth tokens for connection (%s)", ids)
    outcome = manager.refresh_connection(request.integration_id, request.connection_id, request.tenant_id)
    event = outcome_event(request, outcome, attempts)
    publisher.publish([event])
    if outcome.succeeded:
        logger.info("OAuth tokens refreshed successfully (%s)", ids)
    else:
        logger.warning(
            "OAuth token refresh failed (%s code=%s httpStatus=%s retryable=%s attempts=%d)",
            ids,
            outcome.error_code,
            outcome.http_status,
            outcome.retryable,
            attempts,
        )
    return event


def handle_refresh_requested_message(body: bytes, delivery_count: int | None = None) -> CloudEvent:
    """The sync_refresh_handler function: parse the trigger message, refresh, publish the outcome."""
    _, request = parse_event(body, REFRESH_REQUESTED)
    return refresh_connection_token(
        request, runtime.manager_client(), runtime.publisher(), attempts=max(1, delivery_count or 1)
    )
