"""State this app owns, in its own Cosmos container (COSMOS_STATE_CONTAINER, partition key /id).
The platform's connection documents are never written.

- Claims, one per refresh request (id = the request's deterministic event id): at most one
  invocation calls integration-manager for a request at a time, a request that already ended is
  not called again, and the outcome event is kept so that a redelivery can publish it if the first
  publish failed.
- Failure records, one per connection: a connection whose refresh failed permanently is not
  requested again until its document changes (Cosmos `_ts`) or TOKEN_REFRESH_FAILURE_COOLDOWN_MS
  has passed (docs/failure-handling.md).
- Pacing, one per integration when the check schedules refreshes: how far its schedule reaches, so
  the next page, follow-up check or check continues it (shared.refresh_schedule).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from shared.ids import text_key
from shared.settings import Settings

logger = logging.getLogger(__name__)

CLAIM_TTL_S = 7 * 24 * 3600  # claims outlive any redelivery or duplicate-detection window


class ClaimState(StrEnum):
    """Where a refresh request is (a claim's `state`; stored as the string value)."""

    IN_PROGRESS = "in_progress"  # an invocation holds it (until leaseUntil)
    RETRY_PENDING = "retry_pending"  # a transient failure: the next delivery (or scheduled copy) goes on
    REFRESHED = "refreshed"
    FAILED = "failed"
    SKIPPED = "skipped"  # ended without an outcome: the connection was revoked or deleted while retrying


TERMINAL_STATES = (ClaimState.REFRESHED, ClaimState.FAILED, ClaimState.SKIPPED)


@dataclass
class ClaimResult:
    """StateStore.claim's answer: `status` (see there) and the claim document as stored, the caller's own when
    "acquired", the existing one otherwise."""

    status: Literal["acquired", "done", "busy", "conflict"]
    claim: dict[str, Any] | None


class StateStore:
    """The app's state container (see the module docstring). One instance per process (shared.runtime); concurrent
    invocations and hosts are kept apart by etag-guarded writes in Cosmos, not by locks. Times are epoch ms,
    except Cosmos `_ts` (epoch s)."""

    def __init__(self, container: Any):
        self._container = container

    @classmethod
    def from_settings(cls, settings: Settings, cosmos_client: Any) -> StateStore:
        """The store over COSMOS_STATE_CONTAINER. With COSMOS_KEY it creates the container if missing; with managed
        identity (data-plane roles only) the deployment must have created it."""
        database = cosmos_client.get_database_client(settings.cosmos_database)
        if settings.cosmos_key is not None:
            # Key-based access may create containers; with managed identity (data-plane roles only)
            # the deployment creates it.
            return cls(cls.ensure_container(database, settings.cosmos_state_container))
        return cls(database.get_container_client(settings.cosmos_state_container))

    @staticmethod
    def ensure_container(database: Any, name: str) -> Any:
        """Create the state container if missing (deployments create it; the tools and tests use this)."""
        from azure.cosmos import PartitionKey

        return database.create_container_if_not_exists(name, partition_key=PartitionKey("/id"), default_ttl=-1)

    def _get(self, item_id: str) -> dict[str, Any] | None:
        from azure.cosmos.exceptions import CosmosResourceNotFoundError

        try:
            return self._container.read_item(item_id, partition_key=item_id)  # a point read: 1 RU
        except CosmosResourceNotFoundError:
            return None

    # Claims --------------------------------------------------------------------------------------

    def get_claim(self, request_id: str) -> dict[str, Any] | None:
        """The claim of a request (its event id), or None: never claimed, or dropped by TTL (CLAIM_TTL_S)."""
        return self._get(f"claim-{request_id}")

    def claim(  # noqa: PLR0911 - one return per way a claim can end
        self,
        request_id: str,
        key: str,
        now_ms: int,
        lease_ms: int,
        requested_at_ms: int | None = None,
        *,
        take_over_live_lease: bool = False,
        holder: dict[str, Any] | None = None,
        calls_window_ms: int = 0,
        attempt_round: int | None = None,
    ) -> ClaimResult:
        """Claim the request: "acquired" (go ahead), "done" (it ended: see the stored outcome), "busy" (another
        invocation holds a live lease; `take_over_live_lease` when the caller knows that holder is gone) or
        "conflict" (the request id belongs to another connection: a claim is bound to the connection that first
        used it). Take-overs are etag-guarded: of two contenders, one wins. `round` counts the times a later
        check asked again after the request had ended retryable; outcome event ids and idempotency keys include
        it. `holder` (message id and delivery count) and `callsUntil` (now + `calls_window_ms`) say who holds a
        live claim and until when its calls may run, for a redelivery of the same message to take over safely.

        `key` is the connection_key; `now_ms` and `requested_at_ms` are epoch ms, `lease_ms` and
        `calls_window_ms` durations in ms. Cosmos errors other than a lost race propagate."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosAccessConditionFailedError, CosmosResourceExistsError

        item_id = f"claim-{request_id}"
        fresh = {
            "id": item_id,
            "kind": "claim",
            "connectionKey": key,
            "state": ClaimState.IN_PROGRESS,
            "leaseUntil": now_ms + lease_ms,
            "attempts": 0,
            "published": False,
            "updatedAt": now_ms,
            "round": 0,
            "holder": holder,
            "callsUntil": now_ms + calls_window_ms,
            "ttl": CLAIM_TTL_S,
        }
        try:
            return ClaimResult("acquired", self._container.create_item(fresh))
        except CosmosResourceExistsError:
            existing = self._get(item_id)
        if existing is None:  # removed in between (TTL): take it fresh
            return ClaimResult("acquired", self._container.upsert_item(fresh))
        if existing.get("connectionKey") != key:
            return ClaimResult("conflict", existing)
        asked_again = superseded(existing, requested_at_ms, attempt_round)
        if existing["state"] in TERMINAL_STATES and not asked_again:
            return ClaimResult("done", existing)
        if (
            existing["state"] == ClaimState.IN_PROGRESS
            and existing.get("leaseUntil", 0) > now_ms
            and not take_over_live_lease
        ):
            return ClaimResult("busy", existing)
        # A retry of an earlier delivery, or a lease that ran out (its holder died): take it over,
        # but only if nobody else did first (etag).
        taken = existing | {
            "state": ClaimState.IN_PROGRESS,
            "leaseUntil": now_ms + lease_ms,
            "updatedAt": now_ms,
            "holder": holder,
            "callsUntil": now_ms + calls_window_ms,
        }
        if asked_again:  # a later check asked again after transient failures ended it: a new attempt
            taken = {k: v for k, v in taken.items() if k != "outcome"} | {
                "published": False,
                "notBefore": 0,
                "retries": 0,
                "copies": 0,
                "round": existing.get("round", 0) + 1,
            }
        try:
            replaced = self._container.replace_item(
                item_id, taken, etag=existing["_etag"], match_condition=MatchConditions.IfNotModified
            )
        except CosmosAccessConditionFailedError:
            return ClaimResult("busy", existing)
        return ClaimResult("acquired", replaced)

    def finish_claim(
        self,
        claim: dict[str, Any],
        state: str,
        attempts: int,
        now_ms: int,
        *,
        outcome: dict | None = None,
        published: bool = False,
        not_before_ms: int = 0,
        in_flight_until_ms: int = 0,
        retries: int | None = None,
        copies: int | None = None,
    ) -> dict[str, Any]:
        """Record how this delivery ended: its outcome event and whether that was published. `not_before_ms`: the
        callee's Retry-After, for the next delivery; `in_flight_until_ms`: until when the last call may still be
        running at integration-manager (no new call before).

        `state` is a ClaimState; `attempts` counts the calls made for the request so far. Ends the lease, so the
        next delivery can claim at once. A plain write (no etag): only the claim's holder calls it. Returns the
        stored document. Times are epoch ms."""
        updated = {k: v for k, v in claim.items() if not k.startswith("_")}
        updated.update(
            state=state,
            attempts=attempts,
            updatedAt=now_ms,
            leaseUntil=0,
            notBefore=not_before_ms,
            inFlightUntil=in_flight_until_ms,
            callsUntil=0,
        )
        if outcome is not None:
            updated.update(outcome=outcome, published=published)
        if retries is not None:  # scheduled retries of this round so far (failures: TOKEN_REFRESH_MAX_DELIVERY_COUNT)
            updated["retries"] = retries
        if copies is not None:  # scheduled copies of this round so far (retries, and calls paced to a later slot)
            updated["copies"] = copies
        return self._container.upsert_item(updated)

    def mark_published(self, claim: dict[str, Any]) -> None:
        """Record that a stored outcome, published late by a redelivery, has now been published."""
        updated = {k: v for k, v in claim.items() if not k.startswith("_")} | {"published": True}
        self._container.upsert_item(updated)

    # Failure records -----------------------------------------------------------------------------

    def record_permanent_failure(self, key: str, document_ts: int | None, code: str, now_ms: int, ttl_ms: int) -> None:
        """Record that the connection `key` failed for good with `code` at document version `document_ts` (Cosmos
        `_ts`), counting repeats; connection_history reads it. `ttl_ms` (the cooldown) > 0 lets Cosmos drop the
        record after it; 0 sets no TTL."""
        item_id = f"failure-{key}"
        previous = self._get(item_id)
        record = {
            "id": item_id,
            "kind": "failure",
            "connectionKey": key,
            "documentTs": document_ts,
            "code": code,
            "lastFailureAt": now_ms,
            "failures": (previous or {}).get("failures", 0) + 1,
        }
        if ttl_ms > 0:
            record["ttl"] = max(1, ttl_ms // 1000)
        self._container.upsert_item(record)

    def connection_history(
        self,
        candidates: dict[str, int | None],
        now_ms: int,
        cooldown_ms: int,
        refreshed_since_ms: int,
        request_ids: dict[str, str] | None = None,
    ) -> ConnectionHistory:
        """What this app did lately to `candidates` (connection key -> document _ts), in one query:
        a permanent failure recorded for the same document version within the cooldown (not requested
        again), the latest refresh since `refreshed_since_ms` (a claim that ended refreshed), and for
        `request_ids` (connection key -> the id of the request a check would send now) the attempt round that
        request must carry (next_attempt_round)."""
        if not candidates:
            return ConnectionHistory({}, {}, {})
        claim_ids = {f"claim-{request_id}": key for key, request_id in (request_ids or {}).items()}
        rows = self._container.query_items(
            "SELECT c.id, c.kind, c.connectionKey, c.documentTs, c.lastFailureAt, c.code, c.failures, c.updatedAt, "
            "c.state, c.round, c.outcome.data.retryable, c.outcome.data.error.code AS errorCode, c.since "
            "FROM c WHERE ARRAY_CONTAINS(@ids, c.id) OR c.kind = 'held' OR (c.kind = 'claim' AND c.state = @refreshed "
            "AND c.updatedAt >= @since AND ARRAY_CONTAINS(@keys, c.connectionKey))",
            parameters=[
                {
                    "name": "@ids",
                    "value": ([f"failure-{key}" for key in candidates] if cooldown_ms > 0 else []) + list(claim_ids),
                },
                {"name": "@refreshed", "value": ClaimState.REFRESHED},
                {"name": "@since", "value": refreshed_since_ms},
                {"name": "@keys", "value": list(candidates)},
            ],
            enable_cross_partition_query=True,
        )
        history = ConnectionHistory({}, {}, {})
        rows = list(rows)
        # Codes whose failures since then were most of a wave (hold_failures): not held against the connections.
        held = {row.get("code"): row.get("since", 0) for row in rows if row.get("kind") == "held"}

        def was_systemic(code: Any, at_ms: Any) -> bool:
            return code in held and (at_ms or 0) >= held[code]

        for row in rows:
            key = row.get("connectionKey")
            if key not in candidates:
                continue
            if row.get("kind") == "claim":
                if claim_ids.get(row.get("id")) == key:
                    # Ended as the connection's fault, but it was ours (held): asked again, as a retryable one is.
                    ended = (
                        row | {"retryable": True} if was_systemic(row.get("errorCode"), row.get("updatedAt")) else row
                    )
                    history.attempt_rounds[key] = next_attempt_round(ended, now_ms)
                if row.get("state") == ClaimState.REFRESHED and row.get("updatedAt", 0) >= refreshed_since_ms:
                    history.refreshed_at[key] = max(history.refreshed_at.get(key, 0), row.get("updatedAt", 0))
            elif (
                row.get("documentTs") == candidates[key]
                and now_ms - row.get("lastFailureAt", 0) < cooldown_ms
                and not was_systemic(row.get("code"), row.get("lastFailureAt"))
            ):
                history.suppressed[key] = row
        return history

    # Failure waves ---------------------------------------------------------------------------------

    def note_failure_wave(
        self, signature: str, key: str, now_ms: int, window_ms: int, threshold: int
    ) -> FailureWave | None:
        """Count `key` (a connection) among those that failed with `signature` within the current
        window (a window starts with its first failure and lasts `window_ms`). Exactly one caller per
        window sees `raised_now` (etag-guarded), when the distinct count reaches `threshold`. Best
        effort: None when the store kept refusing (contention), so a refresh never fails for it."""

        raised_now = False

        def counted(existing: dict[str, Any] | None) -> dict[str, Any]:
            nonlocal raised_now
            if existing is None or now_ms - existing.get("windowStart", 0) >= window_ms:
                wave = {"windowStart": now_ms, "keys": [], "failures": 0, "alarmedAt": None}
            else:
                wave = {k: existing[k] for k in ("windowStart", "keys", "failures", "alarmedAt")}
            keys = list(wave["keys"])
            if key not in keys and len(keys) < WAVE_KEYS_KEPT:
                keys.append(key)
            raised_now = wave["alarmedAt"] is None and len(keys) >= threshold
            return {
                "kind": "wave",
                "signature": signature,
                "windowStart": wave["windowStart"],
                "keys": keys,
                "failures": wave["failures"] + 1,
                "alarmedAt": now_ms if raised_now else wave["alarmedAt"],
                "ttl": max(60, 2 * window_ms // 1000),
            }

        item = self._update_guarded("wave-" + text_key(signature), counted)
        if item is None:
            logger.debug("Could not count a failure of wave %s (contention)", signature)
            return None
        return FailureWave(
            connections=len(item["keys"]),
            failures=item["failures"],
            window_start_ms=item["windowStart"],
            alarmed=item["alarmedAt"] is not None,
            raised_now=raised_now,  # as of the write that succeeded
        )

    def alarm_wave(self, signature: str, now_ms: int) -> bool:
        """Raise the alarm of the current wave of `signature` (one whose raising needs more than a count, see
        shared.failure_waves.count_connection_failure): True for exactly one caller per window (etag-guarded)."""
        raised_now = False

        def alarmed(existing: dict[str, Any] | None) -> dict[str, Any]:
            nonlocal raised_now
            wave = dict(existing or {"kind": "wave", "signature": signature, "windowStart": now_ms, "keys": []})
            wave = {k: v for k, v in wave.items() if not k.startswith("_")}
            raised_now = wave.get("alarmedAt") is None
            return wave | {"alarmedAt": wave.get("alarmedAt") or now_ms}

        return self._update_guarded("wave-" + text_key(signature), alarmed) is not None and raised_now

    def outcomes_since(self, since_ms: int) -> int:
        """How many refresh requests ended (refreshed or failed) since `since_ms`: the size of a wave, for "most of
        it failed the same way". One cross-partition count; only asked when a wave is big enough to matter."""
        rows = self._container.query_items(
            "SELECT VALUE COUNT(1) FROM c WHERE c.kind = 'claim' AND c.updatedAt >= @since "
            "AND (c.state = @refreshed OR c.state = @failed)",
            parameters=[
                {"name": "@since", "value": since_ms},
                {"name": "@refreshed", "value": ClaimState.REFRESHED},
                {"name": "@failed", "value": ClaimState.FAILED},
            ],
            enable_cross_partition_query=True,
        )
        return int(sum(rows))

    def hold_failures(self, code: str, since_ms: int, ttl_ms: int) -> None:
        """Failures of the connections' own kind with `code` since `since_ms` were a systemic fault (most of a wave
        failed so): connection_history no longer holds them against their connections, and their requests are
        asked again. Kept as long as such a failure record could suppress (`ttl_ms`, the cooldown)."""
        item_id = "held-" + text_key(code)
        earlier = self._get(item_id)  # a wave held before, still in force: keep holding from its start
        self._container.upsert_item(
            {
                "id": item_id,
                "kind": "held",
                "code": code,
                "since": min(since_ms, earlier["since"]) if earlier and "since" in earlier else since_ms,
                "ttl": max(60, ttl_ms // 1000),
            }
        )

    # Pacing -----------------------------------------------------------------------------------------

    def take_call_slot(self, integration_id: str, spacing_ms: int, now_ms: int, max_wait_ms: int) -> CallSlot:
        """The integration's next free call slot, shared by every host: max(now, the slot after the last one
        taken). Taken (the next one moves `spacing_ms` on, etag-guarded) when it starts within `max_wait_ms`;
        otherwise left for earlier comers and returned untaken, to come back at. One read and one write."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosAccessConditionFailedError, CosmosResourceExistsError

        item_id = "slots-" + text_key(integration_id)
        for _ in range(8):
            existing = self._get(item_id)
            slot = max(now_ms, int((existing or {}).get("nextFree", 0)))
            if slot - now_ms > max_wait_ms:
                return CallSlot(slot, taken=False)
            item = {
                "id": item_id,
                "kind": "slots",
                "integrationId": integration_id,
                "nextFree": slot + spacing_ms,
                "ttl": 86_400,
            }
            try:
                if existing is None:
                    self._container.create_item(item)
                else:
                    self._container.replace_item(
                        item_id, item, etag=existing["_etag"], match_condition=MatchConditions.IfNotModified
                    )
            except (CosmosAccessConditionFailedError, CosmosResourceExistsError):
                continue  # another host took a slot in between: take the next one
            return CallSlot(slot, taken=True)
        return CallSlot(now_ms + spacing_ms, taken=False)  # heavy contention: come back a slot later

    def pacing(self, integration_id: str) -> dict[str, Any] | None:
        """The schedule the checks have made for `integration_id` so far (shared.refresh_schedule), None if none."""
        return self._get("pacing-" + text_key(integration_id))

    def save_pacing(
        self,
        integration_id: str,
        *,
        next_slot_ms: int,
        scheduled_through_ms: int | None,
        scan: str,
        ttl_s: int,
        stored: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Record how far a check scheduled `integration_id`: its next free slot, the latest expiry it scheduled, and
        the check (`scan`) that did. Merged with what another check wrote meanwhile (etag-guarded): the later slot
        and expiry win, so two checks never hand out the same time twice to a third. `stored`: the document as the
        caller last saw it, so an unchanged one is replaced without reading it first. Returns the document as
        written (pass it back next time), None when the store kept refusing (best effort)."""

        def merged(existing: dict[str, Any] | None) -> dict[str, Any]:
            earlier = existing or {}
            throughs = [t for t in (scheduled_through_ms, earlier.get("scheduledThroughMs")) if t is not None]
            return {
                "kind": "pacing",
                "integrationId": integration_id,
                "nextSlotMs": max(next_slot_ms, earlier.get("nextSlotMs") or 0),
                "scheduledThroughMs": max(throughs, default=None),
                "scan": scan,
                "ttl": max(60, ttl_s),
            }

        written = self._update_guarded("pacing-" + text_key(integration_id), merged, stored)
        if written is None:
            logger.warning("Could not record the refresh schedule of integration %r (contention)", integration_id)
        return written

    def _update_guarded(
        self,
        item_id: str,
        update: Callable[[dict[str, Any] | None], dict[str, Any]],
        known: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Write `update(the document as stored, None if none)` under `item_id`, unless another writer got in between
        (etag): then read again and update on top of theirs. `known`: the document as the caller last saw it, tried
        first without a read. The document as written (with its new etag), or None after 8 tries."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosAccessConditionFailedError, CosmosResourceExistsError

        for attempt in range(8):
            existing = known if attempt == 0 and known is not None else self._get(item_id)
            item = {"id": item_id} | update(existing)
            try:
                if existing is None:
                    return self._container.create_item(item)
                return self._container.replace_item(
                    item_id, item, etag=existing["_etag"], match_condition=MatchConditions.IfNotModified
                )
            except (CosmosAccessConditionFailedError, CosmosResourceExistsError):
                continue  # another writer got in between: update on top of what it wrote
        return None


@dataclass(frozen=True)
class ConnectionHistory:
    """connection_history's answer, by connection key."""

    suppressed: dict[str, dict[str, Any]]  # key -> its permanent failure record, still in force
    refreshed_at: dict[str, int]  # key -> when this app last refreshed it (epoch ms)
    attempt_rounds: dict[str, int]  # key -> the round of the request a check sends now (absent: never claimed)


@dataclass(frozen=True)
class CallSlot:
    """A call slot of an integration (StateStore.take_call_slot): when, and whether it was taken."""

    at_ms: int
    taken: bool


@dataclass(frozen=True)
class FailureWave:
    """Failures of one kind across connections within a window (StateStore.note_failure_wave)."""

    connections: int  # distinct connections seen (kept up to WAVE_KEYS_KEPT)
    failures: int
    window_start_ms: int
    alarmed: bool  # the alarm of this window was raised (by this caller or an earlier one)
    raised_now: bool  # ... by this caller: it logs the one ERROR and publishes the one event


# A wave document keeps this many connection keys at most: the highest threshold allowed
# (TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD), small enough for a cheap document.
WAVE_KEYS_KEPT = 200


def superseded(claim: dict[str, Any], requested_at_ms: int | None, attempt_round: int | None = None) -> bool:
    """A request that ended with a transient failure and was asked for again by a later check (the
    same connection and expiresAt give the same request id): it gets a new attempt. So does one that ended as the
    connection's own failure when the later check sent it in a later round (`attempt_round`): the check found that
    failure was ours after all (StateStore.hold_failures, next_attempt_round)."""
    outcome = (claim.get("outcome") or {}).get("data") or {}
    retryable = outcome.get("retryable") is True or (attempt_round or 0) > int(claim.get("round") or 0)
    return ended_retryable(claim.get("state"), retryable) and (
        requested_at_ms is not None and requested_at_ms > claim.get("updatedAt", 0)
    )


def ended_retryable(state: Any, retryable: Any) -> bool:
    """The claim ended with `refresh.failed`, retryable: a later request for it is a new attempt (a new round)."""
    return state == ClaimState.FAILED and retryable is True


def next_attempt_round(claim: dict[str, Any], now_ms: int) -> int:
    """The attempt round of a request a check sends at `now_ms` for this claim (a projection with `state`, `round`,
    `retryable` and `updatedAt` will do): the claim's round while the request is pending or done, the next one once
    it ended retryable -- the round the claim moves to when that request arrives (StateStore.claim). The round is
    part of the request's Service Bus MessageId (shared.messaging.service_bus_message_id), so duplicate detection,
    which drops a repeated MessageId for its whole history window, lets the new attempt through."""
    current = int(claim.get("round") or 0)
    retryable = (
        claim["retryable"]
        if "retryable" in claim
        else ((claim.get("outcome") or {}).get("data") or {}).get("retryable")
    )
    later = now_ms > claim.get("updatedAt", 0)
    return current + 1 if ended_retryable(claim.get("state"), retryable) and later else current
