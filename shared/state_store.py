"""State this app owns, in its own Cosmos container (COSMOS_STATE_CONTAINER, partition key /id).
The platform's connection documents are never written.

- Claims, one per refresh request (id = the request's deterministic event id): shared.claim, the one module
  that writes them; at most one delivery calls integration-manager for a request at a time, a request that
  already ended is not called again, and the outcome event is kept for a redelivery to publish.
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
from typing import Any

from shared.claim import Claims, ClaimState, next_attempt_round
from shared.ids import text_key
from shared.settings import Settings

logger = logging.getLogger(__name__)


class StateStore:
    """The app's state container (see the module docstring). One instance per process (shared.runtime); concurrent
    invocations and hosts are kept apart by etag-guarded writes in Cosmos, not by locks. Times are epoch ms,
    except Cosmos `_ts` (epoch s)."""

    def __init__(self, container: Any):
        self._container = container
        self._claims = Claims(container)

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

    @property
    def claims(self) -> Claims:
        """The refresh requests' claims (shared.claim: the one module that writes them)."""
        return self._claims

    # Failure records -----------------------------------------------------------------------------

    def record_permanent_failure(self, key: str, request_id: str, code: str, now_ms: int, ttl_ms: int) -> None:
        """Record that the connection `key` failed for good with `code` for the token of request `request_id` (the
        token's version: connection and expiresAt), counting repeats; connection_history reads it. Keyed to the
        token, not the document's `_ts`: integration-manager may write failure details onto the document, which
        must not lift the record, while a reconnect issues a new token. `ttl_ms` (the cooldown) > 0 lets Cosmos
        drop the record after it; 0 sets no TTL."""
        item_id = f"failure-{key}"
        previous = self._get(item_id)
        record = {
            "id": item_id,
            "kind": "failure",
            "connectionKey": key,
            "requestId": request_id,
            "code": code,
            "lastFailureAt": now_ms,
            "failures": (previous or {}).get("failures", 0) + 1,
        }
        if ttl_ms > 0:
            record["ttl"] = max(1, ttl_ms // 1000)
        self._container.upsert_item(record)

    def connection_history(
        self,
        candidates: dict[str, str],
        now_ms: int,
        cooldown_ms: int,
        refreshed_since_ms: int,
        request_ids: dict[str, str] | None = None,
    ) -> ConnectionHistory:
        """What this app did lately to `candidates` (connection key -> the id of the request a check would send now,
        i.e. its token's version), in one query: a permanent failure recorded for the same token within the
        cooldown (not requested again), the latest refresh since `refreshed_since_ms` (a claim that ended
        refreshed), and for `request_ids` (connection key -> the id of the request a check would send now) the
        attempt round that request must carry (next_attempt_round) and, when an earlier check scheduled it for a later
        time and no delivery has come yet, that time (Claims.note_scheduled)."""
        if not candidates:
            return ConnectionHistory({}, {}, {}, {})
        claim_ids = {f"claim-{request_id}": key for key, request_id in (request_ids or {}).items()}
        rows = self._container.query_items(
            CONNECTION_HISTORY_QUERY,
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
        history = ConnectionHistory({}, {}, {}, {})
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
                    if row.get("state") == ClaimState.SCHEDULED:
                        history.scheduled_for[key] = int(row.get("scheduledFor") or 0)
                if row.get("state") == ClaimState.REFRESHED and row.get("updatedAt", 0) >= refreshed_since_ms:
                    history.refreshed_at[key] = max(history.refreshed_at.get(key, 0), row.get("updatedAt", 0))
            elif (
                row.get("requestId") == candidates[key]
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
        ttl_s: int,
        stored: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Record how far a check scheduled `integration_id`: its next free slot. Merged with what another check wrote
        meanwhile (etag-guarded): the later slot wins, so two checks never hand out the same time twice to a third.
        `stored`: the document as the caller last saw it, so an unchanged one is replaced without reading it first.
        Returns the document as written (pass it back next time), None when the store kept refusing (best effort)."""

        def merged(existing: dict[str, Any] | None) -> dict[str, Any]:
            earlier = existing or {}
            return {
                "kind": "pacing",
                "integrationId": integration_id,
                "nextSlotMs": max(next_slot_ms, earlier.get("nextSlotMs") or 0),
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


# StateStore.connection_history's one query: the page's failure records and claims, the held codes, recent refreshes.
CONNECTION_HISTORY_QUERY = (
    "SELECT c.id, c.kind, c.connectionKey, c.requestId, c.lastFailureAt, c.code, c.failures, c.updatedAt, "
    "c.state, c.round, c.outcome.data.retryable, c.outcome.data.error.code AS errorCode, c.since, c.scheduledFor "
    "FROM c WHERE ARRAY_CONTAINS(@ids, c.id) OR c.kind = 'held' OR (c.kind = 'claim' AND c.state = @refreshed "
    "AND c.updatedAt >= @since AND ARRAY_CONTAINS(@keys, c.connectionKey))"
)


@dataclass(frozen=True)
class ConnectionHistory:
    """connection_history's answer, by connection key."""

    suppressed: dict[str, dict[str, Any]]  # key -> its permanent failure record, still in force
    refreshed_at: dict[str, int]  # key -> when this app last refreshed it (epoch ms)
    attempt_rounds: dict[str, int]  # key -> the round of the request a check sends now (absent: never claimed)
    scheduled_for: dict[str, int]  # key -> when an earlier check scheduled that request, not yet delivered (epoch ms)


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
