"""The claim of a refresh request: the one mechanism behind "never two calls for a request at once", "never called
again once it ended" and "at least one outcome event" (docs/failure-handling.md#the-claim).

One document per request in the state container (id `claim-<request id>`), with a typed state and the transitions
below. This module is the only one that writes a claim, and every write is etag-guarded: a delivery that lost its
claim (its lease ran out and another delivery took over) cannot overwrite the newer holder's record; it gets
ClaimLostError and stops.

    (none) ──note_scheduled (the check paced it to a later time)──▶ SCHEDULED ──acquire──▶ IN_PROGRESS
    (none) ──acquire──▶ IN_PROGRESS ──release──▶ RETRY_PENDING ──acquire──▶ IN_PROGRESS ...
                         │  ▲ acquire: the lease ran out, or a later delivery of the same message
                         ├──finish──▶ REFRESHED | FAILED  (the outcome event is kept; `published` says if it went out)
                         └──skip────▶ SKIPPED  (revoked or deleted meanwhile: no outcome)
    FAILED (retryable) | SKIPPED ──acquire by a later check's request──▶ IN_PROGRESS, round + 1

Times are epoch ms from the caller (the app's clock, shared.times), so a simulation can drive every transition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

CLAIM_TTL_S = 7 * 24 * 3600  # claims outlive any redelivery or duplicate-detection window


class ClaimState(StrEnum):
    """Where a refresh request is (a claim's `state`; stored as the string value)."""

    SCHEDULED = "scheduled"  # a check published it for a later time (scheduledFor); no delivery has come yet
    IN_PROGRESS = "in_progress"  # a delivery holds it (until leaseUntil)
    RETRY_PENDING = "retry_pending"  # a transient failure: the next delivery (or scheduled copy) goes on
    REFRESHED = "refreshed"
    FAILED = "failed"
    SKIPPED = "skipped"  # ended without an outcome: the connection was revoked or deleted meanwhile


# Ended for this round: a redelivery of the same request publishes the stored outcome, never calls again.
TERMINAL_STATES = (ClaimState.REFRESHED, ClaimState.FAILED, ClaimState.SKIPPED)


class ClaimLostError(Exception):
    """A delivery's claim was taken over (its lease ran out): its write was refused, and it must stop."""


@dataclass(frozen=True)
class Claim:
    """A claim as stored (see the module docstring). `etag` is the version this copy was read or written at."""

    id: str
    connection_key: str
    state: ClaimState
    lease_until: int = 0  # epoch ms: the holder's lease (IN_PROGRESS only)
    calls_until: int = 0  # epoch ms: the holder's last call is surely over by then (IN_PROGRESS only)
    attempts: int = 0  # calls made for the request so far
    published: bool = False  # the stored outcome went out
    updated_at: int = 0
    round: int = 0  # times a later check asked again after the request ended retryable (or skipped)
    holder: dict[str, Any] | None = None  # {"messageId", "delivery"} of the delivery holding it
    not_before: int = 0  # epoch ms: a callee's Retry-After, for the next delivery
    in_flight_until: int = 0  # epoch ms: the last call may still be running at integration-manager until then
    retries: int = 0  # scheduled retries of this round (count towards TOKEN_REFRESH_MAX_DELIVERY_COUNT)
    copies: int = 0  # scheduled copies of this round (retries and paced ones): the next copy's MessageId number
    outcome: dict[str, Any] | None = None  # the outcome event, as published (wire form)
    scheduled_for: int = 0  # epoch ms: the time a check scheduled the request's delivery for (SCHEDULED)
    etag: str | None = None
    # Not stored: the holder this copy was taken over from, a delivery that never released it (it died, lost its lock,
    # or met a Cosmos outage, and may then have scheduled a copy the claim could not record).
    taken_from: dict[str, Any] | None = None

    _FIELDS = (
        ("connection_key", "connectionKey"),
        ("lease_until", "leaseUntil"),
        ("calls_until", "callsUntil"),
        ("updated_at", "updatedAt"),
        ("not_before", "notBefore"),
        ("in_flight_until", "inFlightUntil"),
        ("scheduled_for", "scheduledFor"),
    )

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Claim:
        """The claim of a stored document (missing fields take their defaults: older documents)."""
        renamed = dict(cls._FIELDS)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            stored = renamed.get(field.name, field.name)
            if stored in document and document[stored] is not None:
                values[field.name] = document[stored]
        values["holder"] = document.get("holder")
        values["state"] = ClaimState(document["state"])
        values["etag"] = document.get("_etag")
        return cls(**values)

    def document(self) -> dict[str, Any]:
        """The document to store (camelCase, without system fields)."""
        renamed = dict(self._FIELDS)
        stored = {
            renamed.get(field.name, field.name): getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("etag", "taken_from")
        }
        stored["kind"] = "claim"
        stored["state"] = str(self.state)
        stored["ttl"] = CLAIM_TTL_S
        if self.outcome is None:
            del stored["outcome"]
        return stored

    @property
    def retryable_outcome(self) -> bool:
        """Its outcome is a `refresh.failed` with retryable=true."""
        return ((self.outcome or {}).get("data") or {}).get("retryable") is True

    def held_at(self, now_ms: int) -> bool:
        """A delivery holds it now (in progress, lease not run out)."""
        return self.state == ClaimState.IN_PROGRESS and self.lease_until > now_ms

    def calls_over_at(self) -> int:
        """When its holder's calls are surely over: the end of its calls window, but never past its lease (after
        the lease anyone may take it over anyway; settings keep the lease at least the calls window)."""
        return min(self.calls_until, self.lease_until)


@dataclass
class ClaimResult:
    """Claims.acquire's answer: `status` and the claim, the caller's own when "acquired", the existing one
    otherwise."""

    status: Literal["acquired", "done", "busy", "conflict"]
    claim: Claim | None


def ended_retryable(state: Any, retryable: Any) -> bool:
    """The claim ended so that a later check's request for it is a new attempt (a new round): `refresh.failed`
    retryable, or skipped (the connection was revoked or deleted then; a later request means it is back)."""
    return (state == ClaimState.FAILED and retryable is True) or state == ClaimState.SKIPPED


def superseded(claim: Claim, requested_at_ms: int | None, attempt_round: int | None = None) -> bool:
    """A request that ended retryable (or skipped) and was asked for again by a later check (the same connection and
    expiresAt give the same request id): it gets a new attempt. So does one that ended as the connection's own
    failure when the later check sent it in a later round (`attempt_round`): the check found that failure was ours
    after all (StateStore.hold_failures, next_attempt_round)."""
    retryable = claim.retryable_outcome or (attempt_round or 0) > claim.round
    return ended_retryable(claim.state, retryable) and (
        requested_at_ms is not None and requested_at_ms > claim.updated_at
    )


def next_attempt_round(claim: dict[str, Any], now_ms: int) -> int:
    """The attempt round of a request a check sends at `now_ms` for this claim (a stored document, or a projection
    with `state`, `round`, `retryable` and `updatedAt`): the claim's round while the request is pending or done, the
    next one once it ended retryable or skipped -- the round the claim moves to when that request arrives
    (Claims.acquire). The round is part of the request's Service Bus MessageId
    (shared.messaging.service_bus_message_id), so duplicate detection, which drops a repeated MessageId for its whole
    history window, lets the new attempt through."""
    current = int(claim.get("round") or 0)
    retryable = (
        claim["retryable"]
        if "retryable" in claim
        else ((claim.get("outcome") or {}).get("data") or {}).get("retryable")
    )
    later = now_ms > (claim.get("updatedAt") or 0)
    return current + 1 if ended_retryable(claim.get("state"), retryable) and later else current


class Claims:
    """The claims in the state container (one instance per process, through StateStore.claims). Concurrent
    deliveries and hosts are kept apart by etag-guarded writes in Cosmos, not by locks."""

    def __init__(self, container: Any):
        self._container = container

    def get(self, request_id: str) -> Claim | None:
        """The claim of a request (its event id), or None: never claimed, or dropped by TTL (CLAIM_TTL_S)."""
        from azure.cosmos.exceptions import CosmosResourceNotFoundError

        item_id = f"claim-{request_id}"
        try:
            return Claim.from_document(self._container.read_item(item_id, partition_key=item_id))
        except CosmosResourceNotFoundError:
            return None

    def acquire(  # noqa: PLR0911 - one return per way a claim can end
        self,
        request_id: str,
        key: str,
        now_ms: int,
        lease_ms: int,
        requested_at_ms: int | None = None,
        *,
        take_over: Claim | None = None,
        holder: dict[str, Any] | None = None,
        calls_window_ms: int = 0,
        attempt_round: int | None = None,
    ) -> ClaimResult:
        """Claim the request: "acquired" (go ahead), "done" (it ended: see the stored outcome), "busy" (another
        delivery holds a live lease; `take_over`: the live claim, as the caller read it, of a holder it knows is over
        -- taken only if it is still that very version (etag), never a later holder's) or
        "conflict" (the request id belongs to another connection: a claim is bound to the connection that first
        used it). Of two contenders, one wins (create, or replace if the etag is unchanged). `holder` (message id and
        delivery count) and `callsUntil` (now + `calls_window_ms`) say who holds it and until when its calls may
        run, for a redelivery of the same message to take over safely. Cosmos errors other than a lost race
        propagate."""
        from azure.cosmos.exceptions import CosmosResourceExistsError

        fresh = Claim(
            id=f"claim-{request_id}",
            connection_key=key,
            state=ClaimState.IN_PROGRESS,
            lease_until=now_ms + lease_ms,
            calls_until=now_ms + calls_window_ms,
            updated_at=now_ms,
            holder=holder,
        )
        try:
            return ClaimResult("acquired", Claim.from_document(self._container.create_item(fresh.document())))
        except CosmosResourceExistsError:
            existing = self.get(request_id)
        if existing is None:  # removed in between (TTL): take it fresh
            return ClaimResult("acquired", Claim.from_document(self._container.upsert_item(fresh.document())))
        if existing.connection_key != key:
            return ClaimResult("conflict", existing)
        asked_again = superseded(existing, requested_at_ms, attempt_round)
        if existing.state in TERMINAL_STATES and not asked_again:
            return ClaimResult("done", existing)
        if existing.held_at(now_ms) and (take_over is None or take_over.etag != existing.etag):
            return ClaimResult("busy", existing)
        # A retry of an earlier delivery, or a lease that ran out (its holder died): take it over.
        taken = dataclasses.replace(
            existing,
            taken_from=existing.holder if existing.state == ClaimState.IN_PROGRESS else None,
            state=ClaimState.IN_PROGRESS,
            lease_until=now_ms + lease_ms,
            calls_until=now_ms + calls_window_ms,
            updated_at=now_ms,
            holder=holder,
        )
        if asked_again:  # a later check asked again after it ended retryable: a new attempt
            taken = dataclasses.replace(
                taken, outcome=None, published=False, not_before=0, retries=0, copies=0, round=existing.round + 1
            )
        try:
            return ClaimResult("acquired", dataclasses.replace(self._replace(taken), taken_from=taken.taken_from))
        except ClaimLostError:
            # Another delivery took it first: answer with the claim as it is now, so the caller sees who holds it
            # (a later delivery of the same message must know that it replaces that holder).
            return ClaimResult("busy", self.get(request_id) or existing)

    def note_scheduled(self, request_id: str, key: str, at_ms: int, now_ms: int) -> bool:
        """A check published the request for delivery at `at_ms` (pacing): record it as SCHEDULED, so that later
        checks leave it alone while it waits for its time (StateStore.connection_history) instead of guessing from
        the schedule's reach. Only for a request never claimed (False otherwise: an earlier round's claim keeps its
        story). Written after the publish: a crash in between costs one duplicate request, which the claim absorbs."""
        from azure.cosmos.exceptions import CosmosResourceExistsError

        scheduled = Claim(
            id=f"claim-{request_id}",
            connection_key=key,
            state=ClaimState.SCHEDULED,
            updated_at=now_ms,
            scheduled_for=at_ms,
        )
        try:
            self._container.create_item(scheduled.document())
        except CosmosResourceExistsError:
            return False
        return True

    def renew(self, claim: Claim, now_ms: int, *, lease_ms: int, calls_window_ms: int) -> Claim:
        """IN_PROGRESS, still held: a new lease and calls window from now, for a delivery that waited in place (without
        scheduled copies) before calling. ClaimLostError if another delivery took it meanwhile."""
        if claim.state != ClaimState.IN_PROGRESS:
            raise ValueError(f"only a claim in progress is renewed (this one is {claim.state})")
        return self._replace(
            claim, lease_until=now_ms + lease_ms, calls_until=now_ms + calls_window_ms, updated_at=now_ms
        )

    def release(
        self,
        claim: Claim,
        now_ms: int,
        *,
        attempts: int,
        not_before_ms: int = 0,
        in_flight_until_ms: int = 0,
        retries: int | None = None,
        copies: int | None = None,
    ) -> Claim:
        """IN_PROGRESS → RETRY_PENDING: this delivery ends without an outcome, and the next one (a redelivery or a
        scheduled copy) goes on at once. `not_before_ms`: the callee's Retry-After; `in_flight_until_ms`: until when
        the last call may still be running at integration-manager (no new call before). `retries`/`copies`: the
        scheduled retries and copies of this round so far, when this delivery scheduled one."""
        return self._replace(
            self._ended(claim, ClaimState.RETRY_PENDING, now_ms, attempts),
            not_before=not_before_ms,
            in_flight_until=in_flight_until_ms,
            retries=claim.retries if retries is None else retries,
            copies=claim.copies if copies is None else copies,
        )

    def finish(
        self, claim: Claim, state: ClaimState, now_ms: int, *, attempts: int, outcome: dict[str, Any], published: bool
    ) -> Claim:
        """IN_PROGRESS → REFRESHED | FAILED, with the outcome event and whether it was published: a redelivery
        publishes an unpublished one without calling again."""
        if state not in (ClaimState.REFRESHED, ClaimState.FAILED):
            raise ValueError(f"a claim finishes refreshed or failed, not {state}")
        return self._replace(
            self._ended(claim, state, now_ms, attempts), outcome=outcome, published=published, not_before=0
        )

    def skip(self, claim: Claim, now_ms: int, *, attempts: int) -> Claim:
        """IN_PROGRESS → SKIPPED: the connection was revoked or deleted meanwhile; no outcome. A later check's
        request for the same token (it is back) starts a new round (ended_retryable)."""
        return self._replace(self._ended(claim, ClaimState.SKIPPED, now_ms, attempts))

    def mark_published(self, claim: Claim) -> Claim:
        """A stored outcome, published late by a redelivery, has now been published."""
        if claim.state not in TERMINAL_STATES or claim.outcome is None:
            raise ValueError("only an ended claim's stored outcome is published late")
        return self._replace(claim, published=True)

    @staticmethod
    def _ended(claim: Claim, state: ClaimState, now_ms: int, attempts: int) -> Claim:
        if claim.state != ClaimState.IN_PROGRESS:
            raise ValueError(f"only a claim in progress ends (this one is {claim.state})")
        # The lease ends with the delivery: the next one may claim at once.
        return dataclasses.replace(
            claim, state=state, attempts=attempts, updated_at=now_ms, lease_until=0, calls_until=0
        )

    def _replace(self, claim: Claim, **changes: Any) -> Claim:
        """Write `claim` (with `changes`) over the stored one, only if that is still the version this delivery last
        saw (its etag): else another delivery took the claim over, and ClaimLostError."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosAccessConditionFailedError, CosmosResourceNotFoundError

        updated = dataclasses.replace(claim, **changes)
        try:
            stored = self._container.replace_item(
                claim.id, updated.document(), etag=claim.etag, match_condition=MatchConditions.IfNotModified
            )
        except (CosmosAccessConditionFailedError, CosmosResourceNotFoundError) as error:
            raise ClaimLostError(f"{claim.id} was taken over by another delivery") from error
        return Claim.from_document(stored)
