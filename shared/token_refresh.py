"""Refresh and notification steps: on `integration.token.refresh-requested`, ask integration-manager
to refresh the connection, then publish `integration.token.refreshed` or `.refresh.failed`.

Per request (README "Failure handling"):
1. re-read the connection: gone, no longer refreshable, or already refreshed → nothing to do;
2. claim the request in the state store: one invocation at a time, never again once it ended;
3. call integration-manager, retrying transient failures (network, timeouts, 408, 429, 5xx) with
   exponential back-off and jitter, honouring Retry-After, within INTEGRATION_MANAGER_RETRY_BUDGET_MS;
4. still failing transiently and not the last delivery → raise, so the queue redelivers it; on the
   last delivery (TOKEN_REFRESH_MAX_DELIVERY_COUNT) → a `refresh.failed` event with retryable=true;
5. a permanent failure (other 4xx) is not retried: `refresh.failed` with retryable=false, and the
   connection is not requested again until its document changes or the cooldown has passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from shared import runtime
from shared.connection_store import ConnectionStore, parse_expires_at
from shared.events import (
    REFRESH_REQUESTED,
    CloudEvent,
    RefreshedData,
    RefreshError,
    RefreshFailedData,
    RefreshRequestedData,
    make_event,
    parse_trigger_message,
    utc_now,
)
from shared.manager_client import IntegrationManagerClient, RefreshOutcome
from shared.messaging import EventPublisher
from shared.settings import Settings
from shared.state_store import FAILED, REFRESHED, RETRY_PENDING, StateStore, connection_key

logger = logging.getLogger(__name__)

BACKOFF_MAX_S = 10.0


class RefreshRetryLater(RuntimeError):
    """Transient failures used up this delivery's retries: the queue should redeliver the message."""


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


def call_with_retries(
    call: Callable[[], RefreshOutcome],
    max_attempts: int,
    budget_s: float,
    initial_backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[RefreshOutcome, int]:
    """Call until success, a permanent failure, `max_attempts`, or the next wait would pass `budget_s`.
    Waits grow exponentially from `initial_backoff_s` (up to 10 s) with as much jitter, or follow the
    callee's Retry-After when that is longer. Returns the last outcome and the number of calls made."""
    backoff = wait_exponential(multiplier=initial_backoff_s, max=BACKOFF_MAX_S) + wait_random(0, initial_backoff_s)

    def wait(state: Any) -> float:
        retry_after = state.outcome.result().retry_after_s
        return max(backoff(state), retry_after or 0.0)

    retrying = Retrying(
        retry=retry_if_result(lambda outcome: not outcome.succeeded and outcome.retryable),
        wait=wait,
        stop=stop_after_attempt(max_attempts) | stop_before_delay(budget_s),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result(),
        reraise=True,
    )
    calls = 0

    def counted() -> RefreshOutcome:
        nonlocal calls
        calls += 1
        return call()

    return retrying(counted), calls


def already_handled(
    request: RefreshRequestedData, store: ConnectionStore, skip_statuses: tuple[str, ...]
) -> str | None:
    """Why this request needs no call any more (the connection changed since it was made), or None."""
    state = store.current_state(request.tenant_id, request.connection_id)
    if state is None:
        return "the connection no longer exists"
    if isinstance(state.status, str) and state.status.strip().lower() in skip_statuses:
        return f"the connection is now {state.status!r}"
    if request.expires_at is not None and state.expires_at is not None:
        try:
            current = parse_expires_at(state.expires_at)
        except (ValueError, TypeError, OverflowError, OSError):
            return None
        if current > request.expires_at:
            return "the token was refreshed since the request (oauth.expiresAt moved forward)"
    return None


@dataclass(frozen=True)
class RefreshContext:
    """Everything the refresh step talks to (the process's clients, see `shared.runtime`)."""

    settings: Settings
    connections: ConnectionStore
    states: StateStore
    manager: IntegrationManagerClient
    publisher: EventPublisher
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_runtime(cls) -> RefreshContext:
        return cls(
            runtime.settings(),
            runtime.connection_store(),
            runtime.state_store(),
            runtime.manager_client(),
            runtime.publisher(),
        )


def refresh_connection_token(
    request_event: CloudEvent, request: RefreshRequestedData, context: RefreshContext, delivery_count: int = 1
) -> CloudEvent | None:
    settings, connections, states, manager, publisher = (
        context.settings,
        context.connections,
        context.states,
        context.manager,
        context.publisher,
    )
    ids = (
        f"connectionId={request.connection_id!r} integrationId={request.integration_id!r} "
        f"tenantId={request.tenant_id!r}"
    )
    reason = already_handled(request, connections, settings.skip_statuses)
    if reason:
        logger.info("Not refreshing OAuth tokens for connection (%s): %s", ids, reason)
        return None

    key = connection_key(request.tenant_id, request.integration_id, request.connection_id)
    now_ms = int(time.time() * 1000)
    claimed = states.claim(request_event.id, key, now_ms, settings.claim_lease_ms)
    if claimed.status == "busy":
        logger.info("Not refreshing OAuth tokens for connection (%s): another invocation is refreshing it", ids)
        return None
    if claimed.status == "done":
        return _publish_stored_outcome(claimed.claim, states, publisher, ids)

    claim = claimed.claim
    logger.info("Refreshing OAuth tokens for connection (%s)", ids)
    outcome, calls = call_with_retries(
        lambda: manager.refresh_connection(request.integration_id, request.connection_id, request.tenant_id),
        settings.integration_manager_max_attempts,
        settings.integration_manager_retry_budget_ms / 1000,
        settings.integration_manager_backoff_initial_ms / 1000,
        context.sleep,
    )
    attempts = claim.get("attempts", 0) + calls
    last_delivery = delivery_count >= settings.max_delivery_count
    now_ms = int(time.time() * 1000)

    if not outcome.succeeded and outcome.retryable and not last_delivery:
        states.finish_claim(claim, RETRY_PENDING, attempts, now_ms)
        logger.warning(
            "OAuth token refresh will be retried (%s code=%s httpStatus=%s attempts=%d delivery %d of %d)",
            ids,
            outcome.error_code,
            outcome.http_status,
            attempts,
            delivery_count,
            settings.max_delivery_count,
        )
        raise RefreshRetryLater(f"transient failure {outcome.error_code} after {attempts} attempt(s)")

    event = outcome_event(request, outcome, attempts)
    claim = states.finish_claim(
        claim, REFRESHED if outcome.succeeded else FAILED, attempts, now_ms, outcome=event.model_dump(mode="json")
    )
    if outcome.succeeded:
        states.clear_failure(key)
    elif not outcome.retryable:
        states.record_permanent_failure(
            key, _document_ts(connections, request), outcome.error_code or "", now_ms, settings.failure_cooldown_ms
        )
    publisher.publish([event])
    states.mark_published(claim)
    if outcome.succeeded:
        logger.info("OAuth tokens refreshed successfully (%s attempts=%d)", ids, attempts)
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


def _document_ts(connections: ConnectionStore, request: RefreshRequestedData) -> int | None:
    state = connections.current_state(request.tenant_id, request.connection_id)
    return state.document_ts if state else None


def _publish_stored_outcome(
    claim: dict[str, Any], states: StateStore, publisher: EventPublisher, ids: str
) -> CloudEvent | None:
    """A request that already ended: publish its outcome only if that publish never succeeded."""
    stored = claim.get("outcome")
    if claim.get("published") or stored is None:
        logger.info("Not refreshing OAuth tokens for connection (%s): this request was already handled", ids)
        return None
    event = CloudEvent.model_validate(stored)
    publisher.publish([event])
    states.mark_published(claim)
    logger.info("Published the stored outcome of an earlier refresh for connection (%s)", ids)
    return event


def handle_refresh_requested_message(
    body: bytes, delivery_count: int | None = None, message_id: str | None = None
) -> CloudEvent | None:
    """The sync_refresh_handler function: parse the trigger message, refresh, publish the outcome."""
    delivery = max(1, delivery_count or 1)
    envelope, request = parse_trigger_message(body, REFRESH_REQUESTED, message_id, delivery)
    return refresh_connection_token(envelope, request, RefreshContext.from_runtime(), delivery_count=delivery)
