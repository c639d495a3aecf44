"""Refresh and notification steps: on `integration.token.refresh-requested`, ask integration-manager
to refresh the connection, then publish `integration.token.refreshed` or `.refresh.failed`.

Per request (docs/failure-handling.md):
1. re-read the connection: gone, no longer refreshable, or already refreshed → nothing to do;
2. claim the request in the state store: one invocation at a time, never again once it ended;
3. call integration-manager, retrying transient failures (network, timeouts, 408, 409, 429, 5xx)
   with exponential back-off and jitter, honouring Retry-After, within INTEGRATION_MANAGER_RETRY_BUDGET_MS;
4. still failing transiently → a scheduled copy (or a redelivery) tries again later; once the
   deliveries are used up (TOKEN_REFRESH_MAX_DELIVERY_COUNT) → `refresh.failed` with retryable=true;
5. a failure of the connection itself (e.g. invalid_grant) is not retried: `refresh.failed` with
   retryable=false, and the connection is not requested again until its document changes or the
   cooldown has passed;
6. a failure about us or integration-manager (401/403, an unknown path, a redirect; see
   shared.failure_classes) is not retried either, but never held against the connection:
   `refresh.failed` with retryable=true, and many of them raise one alarm (shared.failure_waves).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential, wait_random

from shared import runtime, telemetry
from shared.claim import TERMINAL_STATES, Claim, ClaimLostError, ClaimResult, Claims, ClaimState
from shared.connection_store import ConnectionState, ConnectionStore
from shared.cosmos_errors import describe_store_error, is_store_outage
from shared.errors import RefreshRetryLaterError, RequestIdConflictError
from shared.events import (
    REFRESH_REQUESTED,
    CloudEvent,
    RefreshedData,
    RefreshError,
    RefreshFailedData,
    RefreshRequestedData,
    make_event,
    parse_trigger_message,
)
from shared.failure_classes import UNVERIFIED_REFRESH, FailureKind
from shared.failure_waves import WaveReport, count_connection_failure, count_failure
from shared.ids import connection_key, idempotency_key, outcome_event_id
from shared.manager_client import IntegrationManagerClient, RefreshOutcome
from shared.messaging import EventPublisher, RetryScheduler
from shared.settings import Settings, rate_limit
from shared.state_store import StateStore
from shared.times import epoch_ms, monotonic_s, now_ms, parse_expires_at, utc_now

logger = logging.getLogger(__name__)

BACKOFF_MAX_S = 10.0


class _NoLongerRefreshable(Exception):
    """Raised between retries: the connection was revoked or deleted since the request was made."""


class _OutOfCallsWindow(Exception):
    """Raised before a call: this delivery's calls window is used up (no call may start after it)."""


class _PacedLater(Exception):
    """Raised before a call: the integration's next free call slot is further off than this delivery may wait."""

    def __init__(self, at_ms: int):
        super().__init__(at_ms)
        self.at_ms = at_ms


# A delivery waits at most this long for its integration's next call slot (and at most half its retry budget);
# past it, it comes back as a scheduled copy at the slot instead of holding a worker.
PACING_MAX_WAIT_MS = 10_000
# A delivery that missed its call slot (slow Cosmos, a late wake-up) takes another, this many times at most.
SLOT_TRIES = 3

# Call slots are spaced this much wider than the limit: between its slot and integration-manager a call is delayed by
# a varying few ms (a thread waking, the connection pool), and delayed calls must not bunch past the limit.
PACING_HEADROOM = 1.05


def outcome_event(
    request: RefreshRequestedData, outcome: RefreshOutcome, attempts: int, request_id: str, attempt_round: int = 0
) -> CloudEvent:
    """The `refreshed` or `refresh.failed` event of a request, with its deterministic id."""
    ids = {
        "connection_id": request.connection_id,
        "integration_id": request.integration_id,
        "tenant_id": request.tenant_id,
    }
    now = utc_now()
    if outcome.succeeded:
        data: RefreshedData | RefreshFailedData = RefreshedData(**ids, refreshed_at=now, expires_at=outcome.expires_at)
        return make_event(data, event_id=outcome_event_id(request_id, attempt_round, data.event_type), time=now)
    error = RefreshError(
        code=outcome.error_code or "refresh_failed",
        message=outcome.error_message or "refresh failed",
        http_status=outcome.http_status,
    )
    data = RefreshFailedData(**ids, failed_at=now, error=error, retryable=outcome.retryable, attempts=attempts)
    return make_event(data, event_id=outcome_event_id(request_id, attempt_round, data.event_type), time=now)


def not_called(why: str) -> RefreshOutcome:
    """The outcome of a request that could not call integration-manager within its deliveries (`why`): retryable, the
    next check asks again in a new round."""
    return RefreshOutcome(
        False,
        error_code="not_called",
        error_message=f"integration-manager was not called: {why}",
        kind=FailureKind.TRANSIENT,
        check="TOKEN_REFRESH_RETRY_DELAY_MS (scheduled copies) and the Retry-After integration-manager answers",
    )


def call_with_retries(
    call: Callable[[], RefreshOutcome],
    max_attempts: int,
    budget_s: float,
    initial_backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    *,
    in_flight_s: float = 0.0,
) -> tuple[RefreshOutcome, int]:
    """Call until success, a permanent failure, `max_attempts`, or the next wait would pass `budget_s`.
    Waits grow exponentially from `initial_backoff_s` (up to 10 s) with as much jitter, or follow the
    callee's Retry-After when that is longer; after a call that may still be in flight, at least
    `in_flight_s`. Returns the last outcome and the number of calls made."""
    started = monotonic_s()
    first = call()
    if not first.transient or max_attempts <= 1:
        return first, 1  # the usual case: no retry machinery to set up
    backoff = wait_exponential(multiplier=initial_backoff_s, max=BACKOFF_MAX_S) + wait_random(0, initial_backoff_s)

    def wait(state: Any) -> float:
        last = state.outcome.result()
        return max(backoff(state), last.retry_after_s or 0.0, in_flight_s if last.may_be_in_flight else 0.0)

    def out_of_budget(state: Any) -> bool:
        # tenacity's stop_before_delay, timed from the first call (made above, before tenacity's clock started).
        return monotonic_s() - started + (state.upcoming_sleep or 0.0) >= budget_s

    retrying = Retrying(
        retry=retry_if_result(lambda outcome: outcome.transient),
        wait=wait,
        stop=stop_after_attempt(max_attempts) | out_of_budget,
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result(),
        reraise=True,
    )
    made = [first]
    calls = 1

    def counted() -> RefreshOutcome:
        nonlocal calls
        if made:  # tenacity's first attempt: the call made above
            return made.pop()
        calls += 1
        return call()

    return retrying(counted), calls


def no_longer_refreshable(state: ConnectionState | None, skip: tuple[str, ...]) -> str | None:
    """Why the connection must not be refreshed any more (gone, revoked, ...), or None."""
    if state is None:
        return "the connection no longer exists"
    if isinstance(state.status, str) and state.status.strip().lower() in skip:
        return f"the connection is now {state.status!r}"
    return None


def expiry_moved_forward(request: RefreshRequestedData, state: ConnectionState | None) -> datetime | None:
    """The connection's current expiry when it is later than the one the request was made for."""
    if state is None or request.expires_at is None or state.expires_at is None:
        return None
    try:
        current = parse_expires_at(state.expires_at)
    except (ValueError, TypeError, OverflowError, OSError):
        return None
    # Compared as instants at the request's precision (milliseconds, as on the wire): a document with more fraction
    # digits (.NET's 7, Python's 6) or a fractional epoch is the same expiry, not a later one.
    return current if epoch_ms(current) > epoch_ms(request.expires_at) else None


@dataclass(frozen=True)
class RefreshContext:
    """Everything the refresh step talks to (the process's clients, see `shared.runtime`)."""

    settings: Settings
    connections: ConnectionStore
    states: StateStore
    manager: IntegrationManagerClient
    publisher: EventPublisher
    sleep: Callable[[float], None] = time.sleep
    retry_scheduler: RetryScheduler | None = None  # None: a transient failure is redelivered at once

    @classmethod
    def from_runtime(cls) -> RefreshContext:
        """The context of a function invocation: the process's clients (shared.runtime) and its retry scheduler."""
        return cls(
            runtime.settings(),
            runtime.connection_store(),
            runtime.state_store(),
            runtime.manager_client(),
            runtime.publisher(),
            retry_scheduler=runtime.retry_scheduler(),
        )


def refresh_connection_token(
    request_event: CloudEvent,
    request: RefreshRequestedData,
    context: RefreshContext,
    delivery_count: int = 1,
    message_id: str | None = None,
) -> CloudEvent | None:
    """Refresh one requested connection and publish the outcome: one delivery of its message (the steps are in the
    module docstring). Returns the outcome event published, or re-published from an earlier delivery's claim.

    None means nothing was published: the connection is gone, no longer refreshable or was refreshed since;
    another invocation holds the request; its outcome was published already; or a transient failure was
    scheduled for a retry.

    Raises RefreshRetryLaterError when the queue should redeliver the message (a transient failure without a
    retry scheduler, or an earlier call may still be running), RequestIdConflictError when the request id was
    first used for another connection, and PublishError when the outcome could not be published (it is stored:
    the redelivery publishes it without calling again). Safe to run again for the same message: the claim
    (StateStore.claim) allows one call at a time per request."""
    job = _RefreshJob(request_event, request, context, delivery_count, message_id)
    try:
        return job.run()
    except ClaimLostError:
        # Its lease ran out and another delivery took the request over: that one carries it on from here.
        logger.warning(
            "Stopped refreshing connection (%s): another delivery took the request over (the claim's lease ran out)",
            job.ids,
        )
        return None
    except Exception as error:
        if is_store_outage(error) and job.retry_after_store_outage(error):
            return None  # a scheduled copy comes back later; this delivery is complete
        raise


def schedule_after_store_outage(
    event: CloudEvent,
    request: RefreshRequestedData,
    settings: Settings,
    scheduler: RetryScheduler | None,
    error: BaseException,
    *,
    message_id: str | None,
    not_before_ms: int = 0,
) -> bool:
    """Cosmos failed during a refresh: schedule a copy of the request TOKEN_REFRESH_RETRY_DELAY_MS later (doubling per
    copy, never before `not_before_ms`), as after a failure of integration-manager, so an outage of minutes
    dead-letters nothing. The claim cannot be written meanwhile, so the copy's number travels in its MessageId. False,
    and the caller raises (the queue redelivers), without a scheduler, once the deliveries are used up, or when the
    copy could not be scheduled."""
    retries = scheduled_retry_number(message_id)
    if scheduler is None or settings.retry_delay_ms <= 0 or retries + 1 >= settings.max_delivery_count:
        return False
    now = now_ms()
    at_ms = max(now + retry_delay_ms(settings, retries, request.expires_at, now), not_before_ms)
    try:
        scheduler.schedule_retry(
            event, retries + 1, datetime.fromtimestamp(at_ms / 1000, UTC), attempt_round=request.attempt_round or 0
        )
    except Exception as schedule_error:  # noqa: BLE001 - not scheduled: the queue redelivers instead
        logger.warning("Could not schedule a retry: %s", type(schedule_error).__name__)
        return False
    logger.warning(
        "Cosmos DB failed (%s); the refresh of connection (connectionId=%r integrationId=%r tenantId=%r) will be "
        "retried in %.1f s (retry %d of %d); check COSMOS_ENDPOINT and the account's health",
        describe_store_error(error),
        request.connection_id,
        request.integration_id,
        request.tenant_id,
        (at_ms - now) / 1000,
        retries + 1,
        settings.max_delivery_count - 1,
    )
    return True


def retry_delay_ms(settings: Settings, retries: int, expires_at: datetime | None, now: int) -> int:
    """How long after this delivery the next scheduled copy comes: TOKEN_REFRESH_RETRY_DELAY_MS doubling per retry,
    up to RETRY_DELAY_MAX_MS, and never more than a quarter of the time the token has left (but at least the setting):
    after an outage the next attempt must still come before the token expires, with room for more."""
    delay = min(settings.retry_delay_ms * 2**retries, RETRY_DELAY_MAX_MS)
    if expires_at is not None:
        delay = min(delay, max(settings.retry_delay_ms, (epoch_ms(expires_at) - now) // 4))
    return delay


def scheduled_retry_number(message_id: str | None) -> int:
    """Which scheduled retry a delivery is (0: not a retry), from its MessageId `<id>.retry-<round>.<n>`
    (shared.messaging.service_bus.ServiceBusTransport.schedule_retry)."""
    match = _RETRY_CHAIN.match(message_id or "")
    return int(match["n"]) if match else 0


# A scheduled copy's MessageId, `<id>.retry-<round>.<n>`.
_RETRY_CHAIN = re.compile(r"^(?P<id>.+)\.retry-(?P<round>[0-9]{1,7})\.(?P<n>[0-9]{1,6})$")


def earlier_in_retry_chain(earlier: str, later: str) -> bool:
    """`later` is a scheduled retry (`<id>.retry-<round>.<n>`) of the delivery with MessageId `earlier`: that round's
    first delivery (`<id>`, or `<id>.round-<round>`) or one of its earlier retries."""
    copy = _RETRY_CHAIN.match(later)
    if copy is None:
        return False
    event_id, attempt_round, number = copy["id"], int(copy["round"]), int(copy["n"])
    if earlier == (f"{event_id}.round-{attempt_round}" if attempt_round else event_id):
        return True
    before = _RETRY_CHAIN.match(earlier)
    return (
        before is not None
        and before["id"] == event_id
        and int(before["round"]) == attempt_round
        and int(before["n"]) < number
    )


# Scheduled retries of a transient failure wait at most this long (TOKEN_REFRESH_RETRY_DELAY_MS doubles).
RETRY_DELAY_MAX_MS = 15 * 60 * 1000

# A redelivery waits at most this long for an earlier delivery's calls to be over (Service Bus renews
# the message lock for 5 minutes, host.json maxAutoLockRenewalDuration).
TAKE_OVER_MAX_WAIT_MS = 300_000


class _RefreshJob:
    """One delivery of one refresh request (see the module docstring for the rules)."""

    def __init__(
        self,
        event: CloudEvent,
        request: RefreshRequestedData,
        context: RefreshContext,
        delivery: int,
        message_id: str | None = None,
    ):
        self.event, self.request, self.context, self.delivery = event, request, context, delivery
        self.message_id = message_id
        self.settings, self.states = context.settings, context.states
        self.key = connection_key(request.tenant_id, request.integration_id, request.connection_id)
        self.requested_at_ms = int(request.requested_at.timestamp() * 1000)
        self.held_until_ms = 0  # a claim this delivery acquired: until its calls are surely over (0: none)
        self.calls_deadline_ms = 0  # ... and the latest a call of it may start (its retry budget from the claim on)
        self.ids = (
            f"connectionId={request.connection_id!r} integrationId={request.integration_id!r} "
            f"tenantId={request.tenant_id!r}"
        )
        self.manager = context.manager.location  # where the failed calls went, for the operator who must check it

    def _current(self) -> ConnectionState | None:
        return self.context.connections.current_state(self.request.tenant_id, self.request.connection_id)

    def _skip(self, reason: str) -> None:
        logger.info("Not refreshing OAuth tokens for connection (%s): %s", self.ids, reason)

    @property
    def claims(self) -> Claims:
        return self.states.claims

    def _claim(self, take_over: Claim | None = None) -> ClaimResult:
        settings = self.settings
        # The latest this delivery may still be calling, or a call of it may still be running: no call starts
        # after the retry budget (counted from now, waits included: calls_deadline_ms), plus the last call's
        # timeouts and the manager's in-flight window.
        now = now_ms()
        claimed = self.claims.acquire(
            self.event.id,
            self.key,
            now,
            settings.claim_lease_ms,
            requested_at_ms=self.requested_at_ms,
            take_over=take_over,
            holder={"messageId": self.message_id, "delivery": self.delivery},
            calls_window_ms=settings.calls_window_ms,
            attempt_round=self.request.attempt_round,
        )
        if claimed.status == "acquired":
            assert claimed.claim is not None  # noqa: S101 - acquired claims are returned
            self._hold(claimed.claim, now)
        return claimed

    def _renew(self, claim: Claim) -> Claim:
        """A new lease and calls window from now for the claim this delivery holds (ClaimLostError if it was taken)."""
        now = now_ms()
        renewed = self.claims.renew(
            claim, now, lease_ms=self.settings.claim_lease_ms, calls_window_ms=self.settings.calls_window_ms
        )
        self._hold(renewed, now)
        return renewed

    def _hold(self, claim: Claim, since_ms: int) -> None:
        """This delivery holds `claim` from `since_ms`: its calls are surely over by held_until_ms, and none of them
        starts after calls_deadline_ms (its retry budget)."""
        self.held_until_ms = claim.calls_over_at()
        self.calls_deadline_ms = since_ms + self.settings.integration_manager_retry_budget_ms

    def _holder_is_over(self, claim: Claim) -> bool:
        """The delivery holding `claim` is over: this is a redelivery (the queue hands a message to one delivery at a
        time), or the holder is an earlier delivery of this message or of its retry chain."""
        return self.delivery > 1 or self._redelivered_to_me(claim)

    def _leave_to_holder(self, claim: Claim | None) -> None:
        """Another delivery holds the request, and this one would complete its message. Unless that holder is an
        earlier delivery of this very message (or of its retry chain): the queue took the message from it (a lost
        lock), so completing it here would leave nobody to redeliver it should that holder die. Then raise instead:
        the message comes back, and its next delivery takes over once the holder's calls are over."""
        if claim is not None and self._redelivered_to_me(claim):
            raise RefreshRetryLaterError("an earlier delivery of this message holds the request; it comes back")

    def _redelivered_to_me(self, claim: Claim) -> bool:
        """The live claim is held by an earlier delivery of this very message: the queue handed the
        message out again, so that delivery is over (its host died, or its lock was lost)."""
        holder = claim.holder or {}
        held_by = holder.get("messageId")
        if self.message_id is None or not isinstance(held_by, str):
            return False
        if held_by == self.message_id:
            return self.delivery > int(holder.get("delivery") or 0)
        # This is a scheduled copy of the holder: a delivery that could not release the claim (a Cosmos outage)
        # scheduled it as it ended, so it is over too.
        return earlier_in_retry_chain(held_by, self.message_id)

    def _take_over_from_earlier_delivery(self, claim: Claim) -> ClaimResult:
        """Take the claim of an earlier delivery of this message, once none of its calls can still be
        running (it may only have lost its lock): never two calls for one request at once."""
        # Never past the lease: once it runs out, anyone may take the claim anyway.
        wait_ms = claim.calls_over_at() - now_ms()
        if wait_ms > TAKE_OVER_MAX_WAIT_MS:
            raise RefreshRetryLaterError(
                f"an earlier delivery of this request may be calling for {wait_ms / 1000:.0f} s more"
            )
        if wait_ms > 0:
            logger.info(
                "Taking over the refresh from an earlier delivery of this request (%s) in %.1f s, once its "
                "calls are over",
                self.ids,
                wait_ms / 1000,
            )
            self.context.sleep(wait_ms / 1000)
        # Bound to the version waited for: if another successor took it meanwhile, that one carries on.
        return self._claim(take_over=claim)

    def run(self) -> CloudEvent | None:
        current = self._current()
        reason = no_longer_refreshable(current, self.settings.skip_statuses)
        if reason:
            self._end_pending_round(reason)
            return None
        moved_to = expiry_moved_forward(self.request, current)
        if moved_to is not None:
            return self._already_refreshed(moved_to)
        claimed = self._claim()
        if claimed.status == "busy" and claimed.claim is not None and self._redelivered_to_me(claimed.claim):
            return self._continue_earlier_delivery(claimed.claim)
        return self._proceed(claimed)

    def _end_pending_round(self, reason: str) -> None:
        """The connection is revoked, disabled or gone: no call. The request's round (never claimed, a retry pending, a
        time an earlier check scheduled it for, or held by a delivery that is over) ends SKIPPED, so that when the
        connection is enabled again the next check asks in a new round, which duplicate detection lets through;
        otherwise the same round's MessageId would be dropped for the whole duplicate-detection window. A read and
        two writes, on this path only."""
        existing = self.claims.get(self.event.id)
        if existing is not None and existing.state in TERMINAL_STATES and not existing.published:
            # The round had ended before, but its outcome never went out (a crash between record and publish).
            _publish_stored_outcome(existing, self.claims, self.context.publisher, self.ids)
        elif existing is None or existing.state not in TERMINAL_STATES:
            # Never claimed too: without a SKIPPED claim the next check would send the same round again. A claim in
            # progress is ended only if its holder is over (this message's earlier delivery, or its lease ran out).
            over = existing is not None and self._holder_is_over(existing)
            claimed = self._claim(take_over=existing if over else None)
            if claimed.status == "acquired" and claimed.claim is not None:
                self.claims.skip(claimed.claim, now_ms(), attempts=claimed.claim.attempts)
        self._skip(reason)

    def _proceed(self, claimed: ClaimResult) -> CloudEvent | None:
        if claimed.status == "conflict":
            raise RequestIdConflictError(
                f"request {self.event.id} was first used for another connection; not refreshing ({self.ids})"
            )
        if claimed.status == "busy":
            self._leave_to_holder(claimed.claim)
            self._skip("another invocation is refreshing it")
            return None
        assert claimed.claim is not None  # noqa: S101 - every status but "acquired" comes with the stored claim
        if claimed.status == "done":
            return _publish_stored_outcome(claimed.claim, self.claims, self.context.publisher, self.ids)
        return self._call_and_report(claimed.claim)

    def _continue_earlier_delivery(self, claim: Claim) -> CloudEvent | None:
        """This message was handed out before and that delivery still holds the claim: it is over
        (killed, or its lock was lost), so finish its story instead of dropping the message."""
        claimed = self._take_over_from_earlier_delivery(claim)
        if claimed.status != "acquired" or claimed.claim is None:
            return self._proceed(claimed)
        # Look again: the earlier delivery may have refreshed it, or it was revoked meanwhile.
        current = self._current()
        reason = no_longer_refreshable(current, self.settings.skip_statuses)
        if reason:
            self.claims.skip(claimed.claim, now_ms(), attempts=claimed.claim.attempts)
            self._skip(reason)
            return None
        moved_to = expiry_moved_forward(self.request, current)
        if moved_to is not None:
            return self._already_refreshed(moved_to)
        return self._call_and_report(claimed.claim)

    def _already_refreshed(self, moved_to: datetime) -> CloudEvent | None:
        """The token's expiry moved past the request's. If this request never ran, someone else
        refreshed it: nothing to do. If it ran, finish its story: publish a stored outcome whose
        publish failed, or report `refreshed` for an attempt that died (or timed out) after the
        manager had done the refresh."""
        existing = self.claims.get(self.event.id)
        if existing is not None and existing.connection_key != self.key:
            raise RequestIdConflictError(
                f"request {self.event.id} was first used for another connection; not reporting it ({self.ids})"
            )
        if existing is None:
            self._skip("the token was refreshed since the request (oauth.expiresAt moved forward)")
            return None
        if existing.state in TERMINAL_STATES:
            return _publish_stored_outcome(existing, self.claims, self.context.publisher, self.ids)
        # A redelivery: this message was handed out before and that invocation holds the claim; it
        # stopped after integration-manager had refreshed the token (the expiry moved), e.g. its host
        # was killed. A queue hands a message to one invocation at a time, so the holder is gone:
        # finish its story now instead of waiting out a lease longer than this invocation may run.
        # (Were it merely slow, `refreshed` is published twice -- at-least-once -- and nothing is called.)
        claimed = self._claim(take_over=existing if self._holder_is_over(existing) else None)
        if claimed.status == "busy" and claimed.claim is not None:
            self._leave_to_holder(claimed.claim)
            # Its holder may still publish; wait for its lease when that fits the budget, then look again.
            lease_left_ms = claimed.claim.lease_until - now_ms()
            if lease_left_ms > self.settings.integration_manager_retry_budget_ms:
                self._skip("another invocation holds this request")
                return None
            self.context.sleep(max(0, lease_left_ms) / 1000)
            claimed = self._claim()
        if claimed.status == "busy" or claimed.claim is None:
            self._leave_to_holder(claimed.claim)
            self._skip("another invocation holds this request")
            return None
        if claimed.status == "done":
            return _publish_stored_outcome(claimed.claim, self.claims, self.context.publisher, self.ids)
        attempts = max(1, claimed.claim.attempts)
        logger.info("OAuth tokens were refreshed by an earlier attempt of this request (%s)", self.ids)
        return self._report(claimed.claim, RefreshOutcome(True, expires_at=moved_to), attempts)

    def _call_and_report(self, claim: Claim) -> CloudEvent | None:
        settings = self.settings
        # A call of an earlier delivery may still be running at integration-manager, or its Retry-After still holds:
        # no new call before then (and the connection is looked at again first). The wait counts against this
        # delivery's calls window: when it would reach past it, the request comes back later instead.
        now = now_ms()
        in_flight_ms = claim.in_flight_until - now
        wait_ms = max(claim.not_before - now, in_flight_ms, 0)
        if now + wait_ms > self.calls_deadline_ms:
            why = "an earlier call may still be in flight" if in_flight_ms > 0 else "integration-manager asked to wait"
            if self._schedules_retries() or wait_ms > TAKE_OVER_MAX_WAIT_MS:
                return self._come_back_later(claim, now + wait_ms, claim.attempts, why)
            # Without scheduled copies the queue redelivers at once, and every delivery that raised for a wait would
            # use one of its deliveries up: wait here instead, then renew the claim (a new calls window from now).
            logger.info("Waiting %.1f s before refreshing connection (%s): %s", wait_ms / 1000, self.ids, why)
            self.context.sleep(wait_ms / 1000)
            claim = self._renew(claim)
            wait_ms = 0
        if wait_ms > 0:
            self.context.sleep(wait_ms / 1000)
        logger.info("Refreshing OAuth tokens for connection (%s)", self.ids)
        previous: list[RefreshOutcome] = []
        look_first = in_flight_ms > 0

        def call() -> RefreshOutcome:
            if previous or look_first:
                # Before every retry, look again: the failed call may have refreshed the token anyway
                # (a timeout, a dropped connection, a gateway's 5xx), or the connection was revoked
                # or deleted meanwhile -- then it must not be called again.
                latest = self._current()
                reason = no_longer_refreshable(latest, settings.skip_statuses)
                if reason:
                    raise _NoLongerRefreshable(reason)
                moved_to = expiry_moved_forward(self.request, latest)
                if moved_to is not None:
                    return RefreshOutcome(True, expires_at=moved_to)
            self._wait_for_call_slot()
            if now_ms() > self.calls_deadline_ms:
                # Slow reads or waits used the window up: a call now could outlast the claim's calls window, which
                # is what lets a redelivery take over safely.
                raise _OutOfCallsWindow
            outcome = self.context.manager.refresh_connection(
                self.request.integration_id,
                self.request.connection_id,
                self.request.tenant_id,
                idempotency_key=idempotency_key(self.event.id, claim.round),
            )
            previous.append(outcome)
            return outcome

        try:
            outcome, calls = call_with_retries(
                call,
                settings.integration_manager_max_attempts,
                max(0, self.calls_deadline_ms - now_ms()) / 1000,
                settings.integration_manager_backoff_initial_ms / 1000,
                self.context.sleep,
                in_flight_s=settings.integration_manager_in_flight_ms / 1000,
            )
        except _PacedLater as later:
            return self._come_back_later(claim, later.at_ms, claim.attempts + len(previous), "paced")
        except _OutOfCallsWindow:
            if not previous:
                return self._come_back_later(claim, now_ms(), claim.attempts, "its calls window was used up")
            outcome, calls = previous[-1], len(previous)
        except _NoLongerRefreshable as stop:
            # Ended for good, without an outcome event: as when a request finds it so at the start.
            self.claims.skip(claim, now_ms(), attempts=claim.attempts + len(previous))
            self._skip(f"{stop} (after {len(previous)} failed call(s))")
            return None
        except Exception:
            # Unexpected: release the claim so a redelivery can try again at once, not after the lease.
            with contextlib.suppress(ClaimLostError):
                self.claims.release(claim, now_ms(), attempts=claim.attempts + 1)
            self.held_until_ms = 0  # released: a retry need not wait for it
            raise
        return self._after_calls(claim, outcome, claim.attempts + calls)

    def _after_calls(self, claim: Claim, outcome: RefreshOutcome, attempts: int) -> CloudEvent | None:
        """The calls of this delivery are over: report the outcome, or retry a transient failure later."""
        settings = self.settings
        if not outcome.succeeded and outcome.may_be_in_flight:
            # The last call may have refreshed after all: look before reporting or retrying.
            moved_to = expiry_moved_forward(self.request, self._current())
            if moved_to is not None:
                outcome = RefreshOutcome(True, expires_at=moved_to)
        if outcome.succeeded:
            outcome = self._verified(outcome)
        if outcome.transient and self._schedules_retries():
            if self._retry_later(claim, outcome, attempts):
                return None  # a scheduled copy comes back later; this delivery is complete
        elif outcome.transient and self.delivery < settings.max_delivery_count:
            not_before, in_flight_until = self._no_call_before(outcome, now_ms())
            self.claims.release(
                claim, now_ms(), attempts=attempts, not_before_ms=not_before, in_flight_until_ms=in_flight_until
            )
            logger.warning(
                "OAuth token refresh will be retried "
                "(%s code=%s httpStatus=%s manager=%s attempts=%d delivery %d of %d)",
                self.ids,
                outcome.error_code,
                outcome.http_status,
                self.manager,
                attempts,
                self.delivery,
                settings.max_delivery_count,
            )
            raise RefreshRetryLaterError(f"transient failure {outcome.error_code} after {attempts} attempt(s)")
        return self._report(claim, outcome, attempts)

    def _wait_for_call_slot(self) -> None:
        """Pacing at call time: a call of a rate-limited integration (TOKEN_REFRESH_RATE_LIMITS) takes the
        integration's next free call slot, shared by every host in the state container, and waits for it. The
        limit then holds for requests delivered late (after an outage, a backlog, a 429 storm), which the check's
        schedule (shared.refresh_schedule) cannot see. Raises _PacedLater when the slot is too far off to wait."""
        rate = rate_limit(self.settings, self.request.integration_id)
        if rate is None:
            return
        spacing_ms = math.ceil(1000 * PACING_HEADROOM / rate)
        for _ in range(SLOT_TRIES):
            now = now_ms()
            # Never past the calls window: a slot after it comes back as a scheduled copy instead.
            max_wait_ms = min(
                PACING_MAX_WAIT_MS,
                self.settings.integration_manager_retry_budget_ms // 2,
                max(0, self.calls_deadline_ms - now - 1),
            )
            slot = self.states.take_call_slot(self.request.integration_id, spacing_ms, now, max_wait_ms)
            if not slot.taken:
                raise _PacedLater(slot.at_ms)
            until_slot_ms = slot.at_ms - now_ms()
            if until_slot_ms > 0:
                self.context.sleep(until_slot_ms / 1000)
            # Taking the slot (a read and a write) or waking up took long enough that the call would land on the next
            # slot's: take a later one instead, so calls stay a spacing apart.
            if now_ms() - slot.at_ms < spacing_ms // 2:
                return

    def _come_back_later(self, claim: Claim, at_ms: int, attempts: int, why: str) -> CloudEvent | None:
        """This delivery cannot call within its calls window (`why`: paced to a later slot of its integration, an
        earlier call may still be in flight, a Retry-After): release the claim and come back at `at_ms`, as a
        scheduled copy (not a failure: it uses none of TOKEN_REFRESH_MAX_DELIVERY_COUNT), or, without a scheduler, as a
        redelivery that waits for `notBefore`."""
        now = now_ms()
        number = self._next_copy_number(claim)
        scheduled = self._schedules_retries()
        if not scheduled and self.delivery >= self.settings.max_delivery_count:
            # The queue would dead-letter this delivery without an outcome: end it now, retryable, uncalled.
            return self._report(claim, not_called(why), attempts)
        self.claims.release(
            claim,
            now,
            attempts=attempts,
            not_before_ms=max(claim.not_before, at_ms),
            in_flight_until_ms=claim.in_flight_until,
            copies=number if scheduled else None,
        )
        self.held_until_ms = 0
        logger.info(
            "The refresh of connection (%s) comes back in %.1f s: %s (integration %r)",
            self.ids,
            (at_ms - now) / 1000,
            why,
            self.request.integration_id,
        )
        if not scheduled:
            raise RefreshRetryLaterError(f"{why}: back in {(at_ms - now) / 1000:.1f} s")
        scheduler = self.context.retry_scheduler
        assert scheduler is not None  # noqa: S101 - _schedules_retries() said so
        at = datetime.fromtimestamp(at_ms / 1000, UTC)
        scheduler.schedule_retry(self.event, number, at, attempt_round=claim.round)
        return None

    def _next_copy_number(self, claim: Claim) -> int:
        """The number of the next scheduled copy of this round (its MessageId `<id>.retry-<round>.<n>` must be new to
        duplicate detection): after every copy so far, retries and paced ones alike."""
        # A holder this claim was taken over from may have scheduled a copy it could not record (a Cosmos outage):
        # numbered one past its own, so count that one as used too, or this copy's MessageId could repeat it.
        previous_holder = (claim.taken_from or {}).get("messageId")
        unrecorded = scheduled_retry_number(previous_holder) + 1 if isinstance(previous_holder, str) else 0
        return max(claim.copies, claim.retries, scheduled_retry_number(self.message_id), unrecorded) + 1

    def _verified(self, outcome: RefreshOutcome) -> RefreshOutcome:
        """A refresh is done when integration-manager says so and the expiry agrees: its answer carries a later
        expiry, or the document now has one. A 2xx that left the expiry where it was ends as a retryable,
        unverified failure (the next check asks again in a new round), never as done for the claim's lifetime."""
        requested = self.request.expires_at
        if requested is None:
            return outcome  # a token without expiry (TOKEN_REFRESH_MAX_AGE_MS): nothing to compare
        if outcome.expires_at is not None and epoch_ms(outcome.expires_at) > epoch_ms(requested):
            return outcome
        try:
            moved_to = expiry_moved_forward(self.request, self._current())
        except Exception as error:  # noqa: BLE001 - unverifiable: the next check asks again, nothing is lost
            logger.warning("Could not read connection (%s) to verify its refresh: %s", self.ids, type(error).__name__)
            moved_to = None
        if moved_to is not None:
            return RefreshOutcome(True, http_status=outcome.http_status, expires_at=moved_to)
        return RefreshOutcome(
            False,
            http_status=outcome.http_status,
            error_code=UNVERIFIED_REFRESH.default_code,
            error_message=f"integration-manager answered HTTP {outcome.http_status} but oauth.expiresAt did not move",
            kind=UNVERIFIED_REFRESH.kind,
            check=UNVERIFIED_REFRESH.check,
        )

    def _no_call_before(self, outcome: RefreshOutcome, now: int) -> tuple[int, int]:
        """After a failed call: when the callee's Retry-After ends, and until when the call may still
        be running at integration-manager (0: it cannot be)."""
        not_before = now + int((outcome.retry_after_s or 0) * 1000)
        in_flight = self.settings.integration_manager_in_flight_ms if outcome.may_be_in_flight else None
        return not_before, 0 if in_flight is None else now + in_flight

    def _schedules_retries(self) -> bool:
        """Transient failures come back as scheduled copies (else the queue redelivers at once)."""
        return self.context.retry_scheduler is not None and self.settings.retry_delay_ms > 0

    def _retry_later(self, claim: Claim, outcome: RefreshOutcome, attempts: int) -> bool:
        """Schedule the next delivery of a transient failure, TOKEN_REFRESH_RETRY_DELAY_MS after this
        one (doubling per retry, up to RETRY_DELAY_MAX_MS; never before a Retry-After or an in-flight
        window), and complete this one: a short outage cannot use up the deliveries. False when the
        request had all its deliveries (TOKEN_REFRESH_MAX_DELIVERY_COUNT, retries included)."""
        settings = self.settings
        # Failures so far: the claim's, and copies a Cosmos outage scheduled, which it could not record.
        known = max(claim.copies, claim.retries)
        retries = claim.retries + max(0, scheduled_retry_number(self.message_id) - known)
        number = self._next_copy_number(claim)
        if retries + 1 >= settings.max_delivery_count:
            return False  # deliveries used up: report it
        now = now_ms()
        delay_ms = retry_delay_ms(settings, retries, self.request.expires_at, now)
        not_before, in_flight_until = self._no_call_before(outcome, now)
        at_ms = max(now + delay_ms, in_flight_until, not_before)
        self.claims.release(
            claim,
            now,
            attempts=attempts,
            not_before_ms=not_before,
            in_flight_until_ms=in_flight_until,
            retries=retries + 1,
            copies=number,
        )
        scheduler = self.context.retry_scheduler
        assert scheduler is not None  # noqa: S101 - _schedules_retries() said so
        at = datetime.fromtimestamp(at_ms / 1000, UTC)
        scheduler.schedule_retry(self.event, number, at, attempt_round=claim.round)
        logger.warning(
            "OAuth token refresh will be retried in %.1f s "
            "(%s code=%s httpStatus=%s manager=%s attempts=%d retry %d of %d)",
            (at_ms - now) / 1000,
            self.ids,
            outcome.error_code,
            outcome.http_status,
            self.manager,
            attempts,
            retries + 1,
            settings.max_delivery_count - 1,
        )
        return True

    def retry_after_store_outage(self, error: BaseException) -> bool:
        """Cosmos failed (unreachable, 5xx, 429 after the SDK's retries): come back as a scheduled copy (see
        schedule_after_store_outage). A claim this delivery acquired stays in progress, and the copy comes no earlier
        than the end of this delivery's calls window (callsUntil); it then takes the claim over as this delivery's
        successor (earlier_in_retry_chain) and looks at the connection again before any call."""
        return schedule_after_store_outage(
            self.event,
            self.request,
            self.settings,
            self.context.retry_scheduler,
            error,
            message_id=self.message_id,
            not_before_ms=self.held_until_ms,
        )

    def _record_permanent_failure(self, outcome: RefreshOutcome) -> None:
        """Keep the next checks from requesting a connection that failed for good. Keyed to the token (this
        request's id: connection and expiresAt): a reconnect issues a new token, so the record stops matching by
        itself, while failure details integration-manager writes onto the document do not lift it. Best effort:
        without it the next check asks again (one more call), while a failing write must never cost the outcome
        event."""
        try:
            self.states.record_permanent_failure(
                self.key,
                self.event.id,
                outcome.error_code or "",
                now_ms(),
                self.settings.failure_cooldown_ms,
            )
        except Exception as error:  # noqa: BLE001 - any store failure: the outcome still goes out
            logger.warning(
                "Could not record the permanent failure of connection (%s): %s; the next check may request it again",
                self.ids,
                error.__class__.__name__,
            )

    def _report(self, claim: Claim, outcome: RefreshOutcome, attempts: int) -> CloudEvent:
        """Record the outcome in the claim, publish it, then mark it published (an outbox, see below): a failed publish
        leaves it recorded as unpublished, so the redelivery publishes the stored outcome without calling
        integration-manager again."""
        counted: WaveReport | None = None
        if outcome.about_connection:
            # Most of a wave failing with the same connection code is ours: then reported as systemic.
            ctx = self.context
            outcome, counted = count_connection_failure(outcome, self.key, self.states, ctx.publisher, self.settings)
        event = outcome_event(self.request, outcome, attempts, self.event.id, claim.round)
        state = ClaimState.REFRESHED if outcome.succeeded else ClaimState.FAILED
        # The outcome is recorded before it is published (an outbox): a Cosmos failure or a crash before the record
        # publishes nothing, and the copy or redelivery that follows decides again; once recorded, it is the outcome,
        # and a redelivery publishes it again if this publish fails. A lost claim (ClaimLostError) publishes nothing.
        ended = self.claims.finish(
            claim, state, now_ms(), attempts=attempts, outcome=event.wire_dict(), published=False
        )
        if outcome.about_connection:
            self._record_permanent_failure(outcome)
        self.context.publisher.publish([event])
        try:
            self.claims.mark_published(ended)
        except Exception as error:  # noqa: BLE001 - it went out; a duplicate request would publish it again, same id
            logger.warning(
                "Published the outcome for connection (%s) but could not record it (%s); a duplicate of the request "
                "would publish it again, with the same id",
                self.ids,
                type(error).__name__,
            )
        if outcome.succeeded:
            logger.info("OAuth tokens refreshed successfully (%s attempts=%d)", self.ids, attempts)
            return event
        quiet = False
        if not outcome.about_connection:
            # Not this connection's fault: counted towards one alarm for all of them (shared.failure_waves).
            wave = counted or count_failure(outcome, self.key, self.states, self.context.publisher, self.settings)
            quiet = wave.already_alarmed
        logger.log(
            logging.INFO if quiet else logging.WARNING,
            "OAuth token refresh failed (%s code=%s httpStatus=%s manager=%s retryable=%s attempts=%d); check %s",
            self.ids,
            outcome.error_code,
            outcome.http_status,
            self.manager,
            outcome.retryable,
            attempts,
            outcome.check or "integration-manager",
        )
        return event


def _publish_stored_outcome(claim: Claim, claims: Claims, publisher: EventPublisher, ids: str) -> CloudEvent | None:
    """A request that already ended: publish its outcome only if that publish never succeeded."""
    stored = claim.outcome
    if claim.published or stored is None:
        logger.info("Not refreshing OAuth tokens for connection (%s): this request was already handled", ids)
        return None
    event = CloudEvent.model_validate(stored)
    publisher.publish([event])
    with contextlib.suppress(ClaimLostError):  # another delivery published and recorded it meanwhile
        claims.mark_published(claim)
    logger.info("Published the stored outcome of an earlier refresh for connection (%s)", ids)
    return event


def handle_refresh_requested_message(
    body: bytes, delivery_count: int | None = None, message_id: str | None = None
) -> CloudEvent | None:
    """The sync_refresh_handler function: parse the trigger message, refresh, publish the outcome."""
    delivery = max(1, delivery_count or 1)
    envelope, request = parse_trigger_message(body, REFRESH_REQUESTED, message_id, delivery)
    telemetry.bind(connectionId=request.connection_id, integrationId=request.integration_id, tenantId=request.tenant_id)
    try:
        context = RefreshContext.from_runtime()  # a new process creates its clients now (with a key: the container)
    except Exception as error:
        scheduler = runtime.retry_scheduler()
        if is_store_outage(error) and schedule_after_store_outage(
            envelope, request, runtime.settings(), scheduler, error, message_id=message_id or None
        ):
            return None
        raise
    return refresh_connection_token(envelope, request, context, delivery_count=delivery, message_id=message_id or None)
