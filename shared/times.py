"""Times as the app writes and reads them: UTC, ISO-8601 with milliseconds and a Z, or epoch ms."""

from __future__ import annotations

import time
from datetime import UTC, datetime
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


def parse_expires_at(value: Any) -> datetime:
    """`oauth.expiresAt` as stored: an ISO-8601 string or epoch milliseconds (int or float)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        return parse_time(value)
    raise ValueError(f"unsupported type {type(value).__name__}")
