"""Selection step: on `integration.token.check-expiring`, find the connections whose token expires
by `thresholdTime` and publish one `integration.token.refresh-requested` per connection.

Streams page by page: each Cosmos page is validated and published as one batch before the next
page is read, so memory does not grow with the number of expiring connections.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared import runtime
from shared.connection_store import ConnectionStore, ExpiringConnection
from shared.cosmos_errors import describe_store_error, is_store_outage
from shared.events import (
    CHECK_EXPIRING,
    CheckExpiringData,
    CloudEvent,
    RefreshRequestedData,
    make_event,
    parse_trigger_message,
)
from shared.ids import connection_key, follow_up_check_id, refresh_request_id
from shared.messaging import EventPublisher
from shared.refresh_schedule import IntegrationSchedule, RefreshScheduler
from shared.settings import SAFETY_MARGIN_MS, Settings
from shared.state_store import StateStore
from shared.times import epoch_ms, format_time, monotonic_s, now_ms, utc_now

logger = logging.getLogger(__name__)


@dataclass
class CheckSummary:
    """What one check invocation did; its fields are the summary log line's. `found`: connections requested;
    `published`: refresh-requested events sent; `invalid`: unusable documents skipped; `suppressed`: failed
    permanently, token unchanged since; `deferred`: see select_for_refresh; `continued`: a follow-up check
    took over the rest of the scan. With pacing (shared.refresh_schedule): `waiting`: scheduled by an earlier check
    for a time still to come (its claim is SCHEDULED); `late`: scheduled after their token expires; `schedules`:
    per integration."""

    found: int = 0
    published: int = 0
    invalid: int = 0
    suppressed: int = 0
    deferred: int = 0  # refreshed by us lately and still valid past the next check (no refresh loop)
    pages: int = 0
    duration_ms: int = 0
    continued: bool = False
    waiting: int = 0
    late: int = 0
    schedules: list[IntegrationSchedule] = field(default_factory=list)


def refresh_requested_event(
    connection: ExpiringConnection,
    requested_at: datetime,
    not_before: datetime | None = None,
    attempt_round: int = 0,
) -> CloudEvent:
    """The refresh-requested event the check publishes for `connection`, to be delivered at `not_before` (None: at
    once). Its id is deterministic (connection + expiresAt, or the document's `_ts` for a token without expiry), so
    finding the same token again gives the same id, whatever its time. `attempt_round` (StateStore's
    next_attempt_round): how many times a request for it was asked again after ending retryable; it goes into the
    Service Bus MessageId, never into the id. The operator's `refresh` uses it too."""
    data = RefreshRequestedData(
        connection_id=connection.connection_id,
        integration_id=connection.integration_id,
        tenant_id=connection.tenant_id,
        expires_at=connection.expires_at,
        requested_at=requested_at,
        not_before=not_before,
        attempt_round=attempt_round or None,
    )
    return make_event(data, event_id=request_id_of(connection), time=requested_at)


def request_id_of(connection: ExpiringConnection) -> str:
    """The id of the refresh request a check sends for `connection` (shared.ids.refresh_request_id)."""
    return refresh_request_id(connection, connection.expires_at, connection.document_ts)


@dataclass
class DryRun:
    """What a check would do now (`check --dry-run`): each connection it would request with the time it would
    schedule it for (None: at once), and with pacing, each integration's schedule. Nothing is published or saved."""

    requests: list[tuple[ExpiringConnection, datetime | None]]
    schedules: list[IntegrationSchedule]
    waiting: int


def plan_check(store: ConnectionStore, states: StateStore, threshold: datetime, settings: Settings) -> DryRun:
    """Run a check's selection and scheduling for connections due by `threshold`, publishing and saving nothing."""
    scheduler = RefreshScheduler(settings, states) if settings.scheduling else None
    dry_run = DryRun([], [], 0)
    for page in store.expiring_connection_pages(threshold, settings.skip_statuses, soonest_first=settings.scheduling):
        selection = select_for_refresh(page.connections, states, settings)
        dry_run.requests.extend(timed_requests(selection.requested, scheduler))
        dry_run.waiting += selection.waiting
    dry_run.schedules = list(scheduler.schedules.values()) if scheduler else []
    return dry_run


def timed_requests(
    connections: list[ExpiringConnection], scheduler: RefreshScheduler | None
) -> list[tuple[ExpiringConnection, datetime | None]]:
    """A page's connections to request, each with the time `scheduler` gives it (None: at once; without a scheduler,
    all at once, in the page's order)."""
    if scheduler is None:
        return [(connection, None) for connection in connections]
    return [(connection, scheduler.time_for(connection)) for connection in soonest_expiring_first(connections)]


def note_scheduled(timed: list[tuple[ExpiringConnection, datetime | None]], states: StateStore) -> None:
    """After a page's publish: record each request paced to a later time as SCHEDULED (Claims.note_scheduled), so the
    next checks leave exactly those alone while they wait. Best effort: without it the next check requests them
    again (duplicates, which the claim absorbs)."""
    now = now_ms()
    try:
        for connection, when in timed:
            if when is not None:
                key = connection_key(connection.tenant_id, connection.integration_id, connection.connection_id)
                states.claims.note_scheduled(request_id_of(connection), key, epoch_ms(when), now)
    except Exception as error:  # noqa: BLE001 - the requests are published; this only saves duplicates
        logger.warning(
            "Could not record the scheduled refresh requests (%s); the next check may request them again",
            describe_store_error(error),
        )


def soonest_expiring_first(connections: list[ExpiringConnection]) -> list[ExpiringConnection]:
    """`connections` by expiry, tokens without expiry (due by age) first. The scan is ordered already when pacing;
    this also orders ISO expiries with an offset other than Z, which Cosmos compares as text."""
    return sorted(connections, key=lambda c: (c.expires_at is not None, c.expires_at or datetime.min))


@dataclass
class Selection:
    """select_for_refresh's answer for one page: the connections to request, how many were suppressed, and the
    lifetimes (ms) of those deferred, for warn_about_short_token_lifetimes."""

    requested: list[ExpiringConnection]
    suppressed: int  # failed permanently, token unchanged since (no refresh storm)
    deferred_lifetimes_ms: list[int]  # refreshed by us lately and still valid past the next check
    attempt_rounds: dict[str, int] = field(default_factory=dict)  # request id -> its round (absent: 0)
    waiting: int = 0  # scheduled by an earlier check for a time still to come: left alone

    def event(self, connection: ExpiringConnection, requested_at: datetime, not_before: datetime | None) -> CloudEvent:
        """The refresh-requested event of one of the `requested` connections, with its attempt round."""
        attempt_round = self.attempt_rounds.get(request_id_of(connection), 0)
        return refresh_requested_event(connection, requested_at, not_before, attempt_round)


def select_for_refresh(connections: list[ExpiringConnection], states: StateStore, settings: Settings) -> Selection:
    """Of a page of expiring connections, those to request now. Not requested:
    - a connection whose refresh failed permanently for this same token (expiresAt) within the
      cooldown: it would fail again;
    - a refresh loop: a connection this app refreshed within the last threshold whose token is still
      valid at the next check plus the safety margin. A token issued for less than the threshold is
      due again the moment it is refreshed (1-hour tokens, a 65-minute threshold: every check would
      refresh it again); it is left for the check that finds it about to expire;
    - this very request, scheduled by an earlier check for a time still to come (its claim is SCHEDULED), or
      come within SCHEDULED_GRACE_MS: it is waiting for its time. Only that request: a new document, a
      reconnected connection or a deferred one is never held back by an earlier check's backlog."""
    now = now_ms()
    keys = {connection_key(c.tenant_id, c.integration_id, c.connection_id): c for c in connections}
    history = states.connection_history(
        {key: request_id_of(c) for key, c in keys.items()},
        now,
        settings.failure_cooldown_ms,
        refreshed_since_ms=now - settings.expiration_threshold_ms,
        request_ids={key: request_id_of(c) for key, c in keys.items()},
    )
    selection = Selection([], len(history.suppressed), [])
    selection.attempt_rounds = {request_id_of(keys[key]): n for key, n in history.attempt_rounds.items() if n}
    for key, connection in keys.items():
        record = history.suppressed.get(key)
        if record is not None:
            logger.info(
                "Not requesting refresh for connection %r (%s): it failed permanently (%s) and its token "
                "has not changed since",
                connection.connection_id,
                connection.integration_id,
                record.get("code"),
            )
            continue
        scheduled_for = history.scheduled_for.get(key)
        if scheduled_for is not None and now < scheduled_for + SCHEDULED_GRACE_MS:
            selection.waiting += 1
            continue
        refreshed_at = history.refreshed_at.get(key)
        expires = int(connection.expires_at.timestamp() * 1000) if connection.expires_at else None
        if refreshed_at and expires and expires > now + settings.interval_ms + SAFETY_MARGIN_MS:
            selection.deferred_lifetimes_ms.append(expires - refreshed_at)
            continue
        selection.requested.append(connection)
    return selection


# A request scheduled by an earlier check still counts as waiting this long after its time: a delivery comes a little
# late (a busy queue, a host restarting). Past it, the next check requests it again (a duplicate the claim absorbs).
SCHEDULED_GRACE_MS = 60_000

# A check-expiring event's thresholdTime may exceed its timestamp + the threshold by this much (clock
# skew between the timer and the handler); anything later is capped (see capped_threshold).
THRESHOLD_SLACK = timedelta(minutes=1)


def capped_threshold(check: CheckExpiringData, settings: Settings, now: datetime) -> datetime:
    """The event's thresholdTime, but never later than the settings allow: its timestamp (or now, when
    the timestamp lies in the future) + TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS + THRESHOLD_SLACK. An
    event with thresholdTime in the year 2999 must not refresh every token of the fleet."""
    allowed = min(check.timestamp, now) + timedelta(milliseconds=settings.expiration_threshold_ms) + THRESHOLD_SLACK
    if check.threshold_time <= allowed:
        return check.threshold_time
    logger.warning(
        "The check-expiring event's thresholdTime %s is later than the settings allow (timestamp + "
        "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS = %s); using %s",
        format_time(check.threshold_time),
        format_time(allowed),
        format_time(allowed),
    )
    return allowed


def warn_about_short_token_lifetimes(deferred_lifetimes_ms: list[int], settings: Settings) -> None:
    """One line per check when tokens refreshed by this app live shorter than the threshold: the
    settings invite a refresh loop (which select_for_refresh breaks)."""
    if not deferred_lifetimes_ms:
        return
    logger.warning(
        "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS (%d) is longer than the lifetime of %d token(s) this app refreshed "
        "lately (median %d ms): they would be refreshed again at every check. Each is left for a later check until "
        "it expires within TOKEN_REFRESH_INTERVAL_MS + %d ms. Set the threshold below the typical token lifetime.",
        settings.expiration_threshold_ms,
        len(deferred_lifetimes_ms),
        int(statistics.median(deferred_lifetimes_ms)),
        SAFETY_MARGIN_MS,
    )


def request_refresh_for_expiring_connections(
    check: CheckExpiringData,
    *,
    store: ConnectionStore,
    states: StateStore,
    publisher: EventPublisher,
    settings: Settings,
) -> CheckSummary:
    """The check: scan the connections due by the event's thresholdTime (capped by the settings, see
    capped_threshold) page by page, keep those select_for_refresh selects, and publish one refresh-requested
    event each, one publish per page, before reading the next page. When the run passes
    TOKEN_REFRESH_CHECK_TIME_BUDGET_MS with pages left, it publishes a follow-up check-expiring event carrying
    the Cosmos continuation and stops (`continued`).

    Raises PublishError, or the Cosmos error of a failed page, after the earlier pages were published. Safe to
    run again for the same event: request ids are deterministic, so a rerun sends the same ids and the refresh
    step recognises requests it has handled."""
    started = monotonic_s()
    summary = CheckSummary()
    threshold = capped_threshold(check, settings, utc_now())
    scheduler = None
    if settings.scheduling:
        scheduler = RefreshScheduler(settings, states)
    pages = store.expiring_connection_pages(
        threshold,
        settings.skip_statuses,
        continuation=check.continuation,
        now=check.timestamp,
        soonest_first=scheduler is not None,
    )
    deferred_lifetimes: list[int] = []
    for page in pages:
        summary.pages += 1
        summary.invalid += page.invalid
        selection = select_for_refresh(page.connections, states, settings)
        summary.suppressed += selection.suppressed
        summary.deferred += len(selection.deferred_lifetimes_ms)
        deferred_lifetimes.extend(selection.deferred_lifetimes_ms)
        timed = timed_requests(selection.requested, scheduler)
        summary.waiting += selection.waiting
        requested_at = utc_now()
        events = [selection.event(connection, requested_at, when) for connection, when in timed]
        if events:
            summary.found += len(events)
            logger.info(
                "Found OAuth connections with expiring tokens (count=%d page=%d thresholdTime=%s)",
                len(events),
                summary.pages,
                format_time(threshold),
            )
            summary.published += publisher.publish(events)
            if scheduler is not None:
                note_scheduled(timed, states)
                scheduler.save()  # after the publish: a crash in between schedules them again, same ids
        # After every page, also one with nothing to publish: a long run of suppressed or invalid
        # pages must hand off too, before the function times out.
        if page.continuation and (monotonic_s() - started) * 1000 >= settings.check_time_budget_ms:
            # Hand the rest of the scan to a follow-up invocation before the function times out.
            if scheduler is not None:
                scheduler.save(final=True)  # the follow-up continues from it
            follow_up = make_event(
                check.model_copy(update={"continuation": page.continuation}),
                event_id=follow_up_check_id(check.timestamp, page.continuation),
            )
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
    warn_about_short_token_lifetimes(deferred_lifetimes, settings)
    if scheduler is not None:
        scheduler.save(final=True)
        scheduler.report()
        summary.schedules = [s for s in scheduler.schedules.values() if s.paced]
        summary.late = sum(s.late for s in summary.schedules)
    summary.duration_ms = int((monotonic_s() - started) * 1000)
    logger.info(
        "Check-expiring run finished (found=%d published=%d invalid=%d suppressed=%d deferred=%d pages=%d "
        "durationMs=%d continued=%s waiting=%d late=%d)",
        summary.found,
        summary.published,
        summary.invalid,
        summary.suppressed,
        summary.deferred,
        summary.pages,
        summary.duration_ms,
        summary.continued,
        summary.waiting,
        summary.late,
        extra={"found": summary.found, "waiting": summary.waiting, "late": summary.late},
    )
    return summary


def handle_check_expiring_message(
    body: bytes, delivery_count: int | None = None, message_id: str | None = None
) -> CheckSummary:
    """The manager_check_handler function: parse the trigger message as a check-expiring event and run the check
    with the process's clients. A body that is not a valid event is logged as a poison message and raises
    InvalidEventError (the queue dead-letters it at its delivery limit); other errors come from
    request_refresh_for_expiring_connections. `delivery_count` and `message_id` only go into that log line."""
    logger.info("Token check-expiring event received")
    envelope, check = parse_trigger_message(body, CHECK_EXPIRING, message_id, max(1, delivery_count or 1))
    logger.info("Checking for tokens expiring by %s (eventId=%s)", format_time(check.threshold_time), envelope.id)
    # A Cosmos outage is waited out here, for up to CHECK_STORE_RETRY_BUDGET_S, and the check run again (safe: its
    # request ids are deterministic): the queue's own redeliveries come within seconds and would use up the
    # check's deliveries in one short outage. Past the budget the error is raised and the queue redelivers.
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential  # first use: cold start

    for attempt in Retrying(
        retry=retry_if_exception(is_store_outage),
        wait=wait_exponential(multiplier=1, min=1, max=30),
        stop=stop_after_delay(CHECK_STORE_RETRY_BUDGET_S),
        before_sleep=_log_store_outage,
        reraise=True,
    ):
        with attempt:
            return request_refresh_for_expiring_connections(
                check,
                store=runtime.connection_store(),
                states=runtime.state_store(),
                publisher=runtime.publisher(),
                settings=runtime.settings(),
            )
    raise AssertionError("unreachable: Retrying returns or raises")  # pragma: no cover


# How long one delivery of a check waits out a Cosmos outage (well inside the 5-minute message lock).
CHECK_STORE_RETRY_BUDGET_S = 120.0


def _log_store_outage(state: Any) -> None:
    """tenacity's before_sleep: one WARNING per wait (a tenacity RetryCallState)."""
    error = state.outcome.exception() if state.outcome else None
    logger.warning(
        "Cosmos DB failed during the check (%s); running it again in %.0f s (attempt %d); check COSMOS_ENDPOINT "
        "and the account's health",
        describe_store_error(error) if error else "unknown",
        state.next_action.sleep if state.next_action else 0,
        state.attempt_number + 1,
    )
