"""Pacing: the time the check schedules each refresh request for (TOKEN_REFRESH_RATE_LIMITS,
TOKEN_REFRESH_SPREAD_MS). The check is the one producer of refresh requests, so pacing them here
paces the whole fleet with no shared state at refresh time: the transport delivers each request at
its time (Service Bus scheduled messages; the local host's schedule queue).

- A limit of R requests/s gives an integration a grid of times 1/R apart, starting where its
  schedule so far ends (its pacing document in the state store), never sooner than SCHEDULE_LEAD_MS
  from now. Each request
  takes the first free grid time at or after its target, so no 1-second window holds more than R.
- The target is now; with a spread, now plus a random delay within TOKEN_REFRESH_SPREAD_MS, but
  never past expiresAt minus SAFETY_MARGIN_MS. A token already inside that margin (or expired) has
  target now: it goes first, undelayed.
- Soonest-expiring first: the scan reads connections in expiresAt order and they take grid times in
  that order. A request whose jittered time would fall after its token's expiry takes the earliest
  free time instead.
- A request scheduled after its token's expiry is late: the backlog cannot finish in time at the
  limit. It is still scheduled, as early as the limit allows, and counted (IntegrationSchedule.late).
- Requests an earlier check scheduled are waiting for their time: a later check leaves exactly those alone (their
  claims are SCHEDULED: shared.expiring_check.select_for_refresh) instead of scheduling them twice.
- A new request is never held back by an earlier check's backlog it is not part of: when the grid, continued after
  that backlog, would give it a time past its token's window, it takes the first free time of a grid of its own
  starting now (`urgent`). Its call then takes the integration's next call slot at call time, between the
  backlog's (shared.token_refresh: pacing at call time), so the limit still holds.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.connection_store import ExpiringConnection
from shared.settings import SAFETY_MARGIN_MS, Settings, rate_limit
from shared.state_store import StateStore
from shared.times import format_time, now_ms

logger = logging.getLogger(__name__)


# A grid time is never sooner than this after the check hands it out: the time it takes to publish and deliver
# a request must not make it late, or it would bunch up with the next one and break the limit.
SCHEDULE_LEAD_MS = 1000

# Between pages, a check records its schedule at most this often (RefreshScheduler.save).
SAVE_EVERY_MS = 5000

# customDimensions.alarm of the one warning per integration and check whose backlog runs late.
BACKLOG_ALARM = "refresh_backlog"


@dataclass
class IntegrationSchedule:
    """One integration's part of one check invocation's schedule: how many requests, their first and last
    times, how many tokens will be refreshed only after they expire (`late`), how many an earlier check had
    scheduled already (`waiting`). Times are epoch ms."""

    integration_id: str
    rate_per_s: float | None
    scheduled: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    late: int = 0
    first_late_expiry_ms: int | None = None  # the soonest expiry among the late ones
    latest_expiry_ms: int | None = None  # the latest expiry scheduled: the wave's "by when"
    urgent: int = 0  # requests that would have waited past their window behind an earlier check's backlog
    # The grid (with a limit): time of index k = origin + k * spacing; _next_free maps a taken index to a
    # candidate for the next free one (a disjoint-set forest with path compression: O(1) amortised).
    _origin_ms: float = 0.0
    _next_free: dict[int, int] = field(default_factory=dict)
    _last_index: int = -1
    _urgent_origin_ms: float = 0.0  # the grid of its own that urgent requests take (from now), with its free list
    _urgent_next_free: dict[int, int] = field(default_factory=dict)
    _stored: dict[str, Any] | None = None  # ... as this invocation last read or wrote it (its etag saves a read)
    _spread: bool = False
    _unsaved: bool = False

    @property
    def paced(self) -> bool:
        """A limit or a spread applies: its schedule is recorded for the next page and check."""
        return self.rate_per_s is not None or self._spread

    @property
    def spacing_ms(self) -> float | None:
        """Time between two grid times (1000 / rate), None without a limit."""
        return None if self.rate_per_s is None else 1000.0 / self.rate_per_s


class RefreshScheduler:
    """Hands out the time of each refresh request of one check invocation (see the module docstring). Not
    thread-safe: one per invocation."""

    def __init__(
        self,
        settings: Settings,
        states: StateStore,
        *,
        clock: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
    ):
        self._settings = settings
        self._states = states
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - spreading load, not a secret
        self.schedules: dict[str, IntegrationSchedule] = {}
        self._saved_at = clock()

    def time_for(self, connection: ExpiringConnection) -> datetime | None:
        """The time to deliver `connection`'s refresh request: an aware datetime (now or later) when a limit or the
        spread applies to its integration, None (at once) otherwise."""
        now = self._clock()
        schedule = self._schedule(connection.integration_id, now)
        expires = None if connection.expires_at is None else int(connection.expires_at.timestamp() * 1000)
        target, window_end = self._target(now, expires)
        spacing = schedule.spacing_ms
        if spacing is None:
            slot = target
        else:
            slot = self._take_grid_time(schedule, spacing, now, target, window_end=window_end, expires=expires)
        self._count(schedule, slot, expires)
        return datetime.fromtimestamp(slot / 1000, UTC) if schedule.paced else None

    def save(self, *, final: bool = False) -> None:
        """Record how far each integration's schedule reaches, after its requests were published. Between pages at
        most once per SAVE_EVERY_MS; `final` (the end of the invocation, a hand-off to a follow-up check) always. A
        crash before a save only makes the retried check schedule those requests again, under the same ids (Service
        Bus drops the copies; the refresh step recognises requests it has handled)."""
        now = self._clock()
        if not final and now - self._saved_at < SAVE_EVERY_MS:
            return
        self._saved_at = now
        for schedule in self.schedules.values():
            if not schedule._unsaved or not schedule.paced:
                continue
            if schedule.spacing_ms is None:
                next_slot = schedule.last_ms or now
            else:
                next_slot = math.ceil(schedule._origin_ms + (schedule._last_index + 1) * schedule.spacing_ms)
            ttl_s = (max(0, next_slot - now) + self._settings.expiration_threshold_ms) // 1000 + 3600
            schedule._stored = self._states.save_pacing(
                schedule.integration_id,
                next_slot_ms=next_slot,
                ttl_s=ttl_s,
                stored=schedule._stored,
            )
            schedule._unsaved = False

    def report(self) -> None:
        """Log this invocation's schedule: one INFO line per integration it paced, and one WARNING per
        integration whose tokens will expire before their turn (customDimensions.alarm = refresh_backlog)."""
        for schedule in self.schedules.values():
            if not schedule.scheduled or not schedule.paced:
                continue
            numbers = {
                "pacedIntegration": schedule.integration_id,
                "scheduled": schedule.scheduled,
                "late": schedule.late,
                "firstAt": format_time(_as_time(schedule.first_ms)),
                "lastAt": format_time(_as_time(schedule.last_ms)),
                "rateLimitPerSecond": schedule.rate_per_s,
            }
            logger.info(
                "Scheduled %d refresh request(s) of integration %r from %s to %s (limit %s, late %d, ahead of an "
                "earlier backlog %d)",
                schedule.scheduled,
                schedule.integration_id,
                numbers["firstAt"],
                numbers["lastAt"],
                describe_rate(schedule.rate_per_s),
                schedule.late,
                schedule.urgent,
                extra=numbers,
            )
            if schedule.late:
                logger.warning(
                    "Integration %r: %d of %d refresh request(s) are scheduled after their token expires: at %s "
                    "the backlog runs until %s, the tokens expire by %s (the first late one at %s). Raise its "
                    "entry in TOKEN_REFRESH_RATE_LIMITS if integration-manager and the provider allow it, or warn "
                    "the provider.",
                    schedule.integration_id,
                    schedule.late,
                    schedule.scheduled,
                    describe_rate(schedule.rate_per_s),
                    numbers["lastAt"],
                    format_time(_as_time(schedule.latest_expiry_ms)),
                    format_time(_as_time(schedule.first_late_expiry_ms)),
                    extra=numbers | {"alarm": BACKLOG_ALARM},
                )

    # The parts ----------------------------------------------------------------------------------

    def _schedule(self, integration_id: str, now: int) -> IntegrationSchedule:
        schedule = self.schedules.get(integration_id)
        if schedule is None:
            rate = rate_limit(self._settings, integration_id)
            earlier = None
            if rate is not None or self._settings.spread_ms > 0:
                earlier = self._states.pacing(integration_id)
            schedule = IntegrationSchedule(integration_id, rate, _stored=earlier, _spread=self._settings.spread_ms > 0)
            # Continue where the schedule so far ends, or start now (plus the lead).
            schedule._origin_ms = float(max(now + SCHEDULE_LEAD_MS, (earlier or {}).get("nextSlotMs") or 0))
            self.schedules[integration_id] = schedule
        return schedule

    def _target(self, now: int, expires: int | None) -> tuple[int, int | None]:
        """When the request should go (now, or a random time within the spread) and the end of its window: the
        latest time still fine for it (the spread's end, or its expiry; None: no end)."""
        spread = self._settings.spread_ms
        if spread <= 0 or expires is None:
            return now, expires
        room = min(spread, expires - SAFETY_MARGIN_MS - now)
        if room <= 0:
            return now, expires  # expired or inside the margin: first, undelayed
        return now + int(self._rng.random() * room), now + room

    def _take_grid_time(
        self,
        schedule: IntegrationSchedule,
        spacing: float,
        now: int,
        target: int,
        *,
        window_end: int | None,
        expires: int | None,
    ) -> int:
        """The first free grid time at or after `target`; if that is past `window_end` (taken by others), the
        earliest free one from now instead, when earlier. If even that leaves less than SAFETY_MARGIN_MS before
        `expires` only because an earlier check's backlog fills the grid, a time of the urgent grid instead."""
        origin = schedule._origin_ms
        earliest = max(0, math.ceil((now + SCHEDULE_LEAD_MS - origin) / spacing))  # never one already (nearly) past
        wanted = max(earliest, math.ceil((target - origin) / spacing))
        index = self._free_index(schedule._next_free, wanted)
        if window_end is not None and origin + index * spacing > window_end and wanted > earliest:
            index = min(index, self._free_index(schedule._next_free, earliest))  # as early as the limit allows
        pushed_by_earlier_backlog = origin > now + SCHEDULE_LEAD_MS
        if expires is not None and origin + index * spacing > expires - SAFETY_MARGIN_MS and pushed_by_earlier_backlog:
            # Too late for its token only because an earlier check's backlog fills the grid before it: not its backlog.
            return self._take_urgent_time(schedule, spacing, now, target)
        schedule._next_free[index] = index + 1
        schedule._last_index = max(schedule._last_index, index)
        return math.ceil(origin + index * spacing)

    @classmethod
    def _take_urgent_time(cls, schedule: IntegrationSchedule, spacing: float, now: int, target: int) -> int:
        """The first free time at or after `target` of the schedule's urgent grid, which starts now (plus the lead)
        and is spaced at the limit: urgent requests keep the limit among themselves, and pacing at call time
        interleaves them with the backlog's."""
        if not schedule._urgent_next_free:
            schedule._urgent_origin_ms = float(now + SCHEDULE_LEAD_MS)
        origin = schedule._urgent_origin_ms
        wanted = max(0, math.ceil((max(target, now + SCHEDULE_LEAD_MS) - origin) / spacing))
        index = cls._free_index(schedule._urgent_next_free, wanted)
        schedule._urgent_next_free[index] = index + 1
        schedule.urgent += 1
        return math.ceil(origin + index * spacing)

    @staticmethod
    def _free_index(next_free: dict[int, int], index: int) -> int:
        free = index
        while free in next_free:
            free = next_free[free]
        while index != free:  # path compression
            index, next_free[index] = next_free[index], free
        return free

    @staticmethod
    def _count(schedule: IntegrationSchedule, slot: int, expires: int | None) -> None:
        schedule.scheduled += 1
        schedule._unsaved = True
        schedule.first_ms = slot if schedule.first_ms is None else min(schedule.first_ms, slot)
        schedule.last_ms = slot if schedule.last_ms is None else max(schedule.last_ms, slot)
        if expires is None:
            return
        schedule.latest_expiry_ms = max(schedule.latest_expiry_ms or expires, expires)
        if slot > expires:
            schedule.late += 1
            first_late = schedule.first_late_expiry_ms
            schedule.first_late_expiry_ms = expires if first_late is None else min(first_late, expires)


def describe_rate(rate_per_s: float | None) -> str:
    """A limit as the operator wrote it, roughly: "5/s", "2/min", "no limit"."""
    if rate_per_s is None:
        return "no limit"
    if rate_per_s >= 1:
        return f"{rate_per_s:g}/s"
    per_minute = rate_per_s * 60
    return f"{per_minute:g}/min" if per_minute >= 1 else f"{rate_per_s * 3600:g}/h"


def _as_time(epoch_ms: int | None) -> datetime | None:
    return None if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, UTC)
