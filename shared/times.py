"""Times as the app writes and reads them: UTC, ISO-8601 with milliseconds and a Z, or epoch ms."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def now_ms() -> int:
    """Epoch milliseconds: the unit of every time the state store keeps."""
    return int(time.time() * 1000)


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
