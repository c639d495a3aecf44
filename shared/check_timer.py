"""Scheduling step: decides when a check runs and publishes `integration.token.check-expiring`.

The Functions timer ticks every minute (check_expiring_timer/function.json); each tick asks
`CheckCadence` whether TOKEN_REFRESH_INTERVAL_MS has passed since this process's last run. The
interval is therefore an application setting: changing it restarts the host with the new value, no
redeploy. The first tick of a process always runs, as the original worker's start() did.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from shared import runtime
from shared.events import CheckExpiringData, CloudEvent, make_event
from shared.settings import Settings
from shared.times import utc_now

logger = logging.getLogger(__name__)

# Timer ticks land a few ms either side of the minute; without slack a 60-minute interval would
# slip to 61. 5% of the interval (at most 30 s) absorbs that without running early in any real sense.
MAX_TICK_SLACK = timedelta(seconds=30)


class CheckCadence:
    """Per-process memory of the last run. Thread-safe; the Functions timer is a singleton."""

    def __init__(self) -> None:
        self._last_run: datetime | None = None
        self._announced = False
        self._lock = threading.Lock()

    def claim_run(self, now: datetime, interval_ms: int) -> bool:
        """True (and remembers `now`) when a check is due: first call, or the interval has passed."""
        interval = timedelta(milliseconds=interval_ms)
        slack = min(MAX_TICK_SLACK, interval * 0.05)
        with self._lock:
            if self._last_run is not None and now - self._last_run < interval - slack:
                return False
            self._last_run = now
            return True

    def release_run(self, now: datetime, previous: datetime | None) -> None:
        """The run claimed at `now` did not happen (publish failed): the next tick may try again."""
        with self._lock:
            if self._last_run == now:
                self._last_run = previous

    @property
    def last_run(self) -> datetime | None:
        """When this process last ran a check; None before its first."""
        return self._last_run

    def announce_once(self) -> bool:
        """True for the first caller in this process only (it logs the started or disabled line)."""
        with self._lock:
            first, self._announced = not self._announced, True
            return first


cadence = CheckCadence()


def build_check_expiring_event(settings: Settings, now: datetime) -> CloudEvent:
    """The check-expiring event of a run at `now` (aware UTC): thresholdTime = now +
    TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS. Not published here: the timer and the operator's `trigger` publish
    it."""
    threshold = now + timedelta(milliseconds=settings.expiration_threshold_ms)
    return make_event(CheckExpiringData(timestamp=now, threshold_time=threshold), time=now)


def run_timer_tick(past_due: bool = False, now: datetime | None = None) -> CloudEvent | None:
    """One timer invocation. Returns the published event, or None when disabled or not yet due."""
    settings = runtime.settings()
    if not settings.enabled:
        if cadence.announce_once():
            logger.warning("Token refresh is disabled (TOKEN_REFRESH_ENABLED=false); no check-expiring events")
        return None
    if cadence.announce_once():
        logger.info(
            "Token refresh worker initialized and started (interval %d ms, threshold %d ms)",
            settings.interval_ms,
            settings.expiration_threshold_ms,
        )
    now = now or utc_now()
    previous = cadence.last_run
    if not cadence.claim_run(now, settings.interval_ms):
        return None
    if past_due:
        logger.info("Timer is past due (the host was busy or restarting); checking now")
    event = build_check_expiring_event(settings, now)
    try:
        runtime.publisher().publish([event])
    except Exception:
        # Not published: the next tick must try again instead of waiting a whole interval.
        cadence.release_run(now, previous)
        raise
    logger.info(
        "Published check-expiring event, integration-manager will handle token refresh detection "
        "(eventId=%s thresholdTime=%s)",
        event.id,
        event.data["thresholdTime"],
    )
    return event
