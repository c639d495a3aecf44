"""Times as the app writes and reads them: UTC, ISO-8601 with milliseconds and a Z, or epoch ms."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

# The clock every module of the app reads (wall time, epoch seconds) and the one durations are timed with. Replaced
# only by use_clock: the deterministic simulation (tests/unit/simulation) runs the protocol on a virtual clock.
_wall_clock: Callable[[], float] = time.time
_monotonic_clock: Callable[[], float] = time.monotonic


@contextlib.contextmanager
def use_clock(wall: Callable[[], float], monotonic: Callable[[], float] | None = None) -> Iterator[None]:
    """Within the block, every time the app reads comes from `wall` (epoch seconds) and durations from `monotonic`
    (seconds; `wall` when omitted)."""
    global _wall_clock, _monotonic_clock
    saved = _wall_clock, _monotonic_clock
    _wall_clock, _monotonic_clock = wall, monotonic or wall
    try:
        yield
    finally:
        _wall_clock, _monotonic_clock = saved


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.fromtimestamp(_wall_clock(), UTC)


def now_ms() -> int:
    """Epoch milliseconds: the unit of every time the state store keeps."""
    return int(_wall_clock() * 1000)


def monotonic_s() -> float:
    """Seconds on a clock that never goes back: for durations (retry budgets, a check's time budget)."""
    return _monotonic_clock()


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with millisecond precision and a Z suffix, e.g. 2026-11-26T14:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; a value without an offset is taken as UTC."""
    moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# An epoch number below this is seconds, at or above it milliseconds: 1e11 ms is 1973-03-03, 1e11 s the year 5138,
# so no expiry of a token issued by a living system is ambiguous.
EPOCH_MS_FLOOR = 100_000_000_000


def parse_expires_at(value: Any) -> datetime:
    """`oauth.expiresAt` as stored: an ISO-8601 string, or an epoch number (int or float), read as seconds or
    milliseconds by its magnitude (EPOCH_MS_FLOOR)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000 if abs(value) >= EPOCH_MS_FLOOR else value, tz=UTC)
    if isinstance(value, str):
        return parse_time(value)
    raise ValueError(f"unsupported type {type(value).__name__}")


def epoch_ms(moment: datetime) -> int:
    """The instant in whole epoch milliseconds, rounded down: the precision of every time on the wire
    (format_time), so an expiry read from a document with more digits and the same expiry carried by a request
    compare equal."""
    return (moment - _EPOCH) // _ONE_MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
