"""Service Bus duplicate detection for one queue, as Microsoft documents it ("Duplicate detection",
learn.microsoft.com/azure/service-bus-messaging/duplicate-detection): the queue remembers the MessageId of every
message it accepted during the history window; a message sent again with a remembered MessageId is reported as
accepted to the sender and silently dropped -- whatever happened to the first message (completed, dead-lettered,
expired). A dropped duplicate does not restart the window.

Shared by the Service Bus model (localdev/service_bus_model.py) and the local host, which applies it to its
RabbitMQ refresh queue. `path` keeps the history in a file, so separate `python -m localdev run --once`
processes see one queue history, as separate Azure hosts do: JSON Lines, one `[message id, accepted at]` per
accepted message, appended (a whole-file rewrite per message would cost O(history) each), rewritten without the
expired entries once they outnumber the live ones. Processes using one file at the same time take turns on it
(an advisory lock, POSIX) and each reads what the others appended before deciding, as hosts sharing one queue
do; deleting the file clears the history, also for a host that is running."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: processes sharing one history file do not take turns on it
    fcntl = None  # type: ignore[assignment]

# The file is rewritten without its expired entries when it holds more than this many lines beyond twice the
# live ones: rarely (amortised O(1) per message) and never for a small history.
COMPACT_SLACK_LINES = 1000


def _wall_clock() -> datetime:
    return datetime.now(UTC)


class DuplicateDetection:
    """The MessageIds a queue accepted within its history window. Thread-safe."""

    def __init__(
        self, window: timedelta, clock: Callable[[], datetime] = _wall_clock, path: Path | None = None
    ) -> None:
        if window <= timedelta(0):
            raise ValueError("a duplicate detection history window must be positive")
        self.window, self._clock, self._path = window, clock, path
        # MessageId -> accepted at (epoch s), in the order accepted: the oldest are forgotten from the front.
        self._accepted: dict[str, float] = {}
        self._lock = threading.Lock()
        # The history file as last read: (device, inode) (None: none read), bytes read, lines (live and expired).
        self._file_identity: tuple[int, int] | None = None
        self._read_up_to = 0
        self._lines = 0
        # Kept open (unbuffered): a message costs a few system calls, not opening files.
        self._appending: IO[bytes] | None = None  # on the file of _file_identity
        self._lock_file: IO[bytes] | None = None

    def first_time(self, message_id: str) -> bool:
        """True, and `message_id` is remembered from now, when the queue accepts the message; False when it is a
        duplicate of one accepted within the window (the sender is told nothing: the message is dropped)."""
        now = self._clock().timestamp()
        horizon = now - self.window.total_seconds()
        with self._lock, self._file_turn():
            self._read_file()
            self._forget_expired(horizon)
            accepted_at = self._accepted.get(message_id)
            if accepted_at is not None and accepted_at > horizon:
                return False  # a duplicate: its window is not restarted
            self._accepted.pop(message_id, None)
            self._accepted[message_id] = now  # at the end: the newest
            self._append(message_id, now, horizon)
            return True

    def forget(self, message_id: str) -> None:
        """The message first_time accepted never reached the queue (its send failed): as Service Bus does not record
        a MessageId it did not take, the next send of it is accepted. (If the failed send did reach the queue after
        all, the message comes twice: the claim absorbs a duplicate, while a lost copy would be lost for good.)"""
        with self._lock, self._file_turn():
            self._read_file()
            self._accepted.pop(message_id, None)
            self._accepted[message_id] = 0.0  # accepted at the epoch: long expired (first_time compares times)
            self._append(message_id, 0.0, self._clock().timestamp() - self.window.total_seconds())

    def _forget_expired(self, horizon: float) -> None:
        """Drop expired entries from the front (the oldest). One accepted out of order (another process's, a
        clock that stepped back) may stay a while longer; first_time compares times, never presence alone."""
        while self._accepted:
            oldest = next(iter(self._accepted))
            if self._accepted[oldest] > horizon:
                return
            del self._accepted[oldest]

    # The history file -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_turn(self) -> Iterator[None]:
        """This process's turn on the history file (other processes wait); nothing without a file or on Windows."""
        if self._path is None or fcntl is None:
            yield
            return
        if self._lock_file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self._path.with_name(self._path.name + ".lock"), "ab", buffering=0)  # noqa: SIM115
        fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    def _read_file(self) -> None:
        """Catch up with the file: what was appended since the last read (by this process or another); all of it
        again when it was replaced (another process rewrote it) or deleted (the history was cleared)."""
        if self._path is None:
            return
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            if self._file_identity is not None:  # deleted: the history was cleared
                self._forget_file()
            return
        if (stat.st_dev, stat.st_ino) != self._file_identity or stat.st_size < self._read_up_to:
            self._forget_file()
            self._file_identity = (stat.st_dev, stat.st_ino)
        if stat.st_size == self._read_up_to:
            return
        with open(self._path, "rb") as history:
            history.seek(self._read_up_to)
            appended = history.read()
        complete = appended[: appended.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read_up_to += len(complete)
        for line in complete.splitlines():
            self._lines += 1
            for message_id, accepted_at in _entries(line):
                self._accepted.pop(message_id, None)
                self._accepted[message_id] = accepted_at

    def _forget_file(self) -> None:
        """Start again from an empty history and no file read (the next append opens the file anew)."""
        if self._appending is not None:
            self._appending.close()
        self._accepted, self._file_identity, self._read_up_to, self._lines, self._appending = {}, None, 0, 0, None

    def _append(self, message_id: str, accepted_at: float, horizon: float) -> None:
        if self._path is None:
            return
        if self._lines > 2 * len(self._accepted) + COMPACT_SLACK_LINES:
            self._rewrite(horizon)
            return
        if self._appending is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._appending = open(self._path, "ab", buffering=0)  # noqa: SIM115 - kept open, see __init__
            stat = os.fstat(self._appending.fileno())
            if (stat.st_dev, stat.st_ino) != self._file_identity:  # created by this open (it had read none)
                self._file_identity, self._read_up_to = (stat.st_dev, stat.st_ino), stat.st_size
        line = _line(message_id, accepted_at)
        self._appending.write(line)
        self._read_up_to += len(line)
        self._lines += 1

    def _rewrite(self, horizon: float) -> None:
        """Replace the file by the live entries (the one just accepted included), atomically."""
        assert self._path is not None  # noqa: S101 - _append checked it
        live = [(k, v) for k, v in self._accepted.items() if v > horizon]
        temporary = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(b"".join(_line(k, v) for k, v in live))
        temporary.replace(self._path)
        if self._appending is not None:
            self._appending.close()
        self._appending = open(self._path, "ab", buffering=0)  # noqa: SIM115 - kept open, see __init__
        stat = os.fstat(self._appending.fileno())
        self._file_identity, self._read_up_to, self._lines = (stat.st_dev, stat.st_ino), stat.st_size, len(live)


def _line(message_id: str, accepted_at: float) -> bytes:
    return f"[{json.dumps(message_id, ensure_ascii=False)},{accepted_at!r}]\n".encode()


def _entries(line: bytes) -> list[tuple[str, float]]:
    """The (message id, accepted at) pair of one line, `[id, at]`; none for an unreadable line (the local host's
    own file: never worth a failure)."""
    try:
        value: Any = json.loads(line)
        if isinstance(value, list) and len(value) == 2:
            return [(str(value[0]), float(value[1]))]
    except (ValueError, TypeError, RecursionError):
        pass
    return []
