"""Service Bus delivery semantics for the simulation, as Microsoft documents them (docs/failure-handling.md, "What
the app relies on from Service Bus"): peek-lock with a lock the Functions host renews for
maxAutoLockRenewalDuration, at-least-once delivery, DeliveryCount growing on abandon or lock expiry, dead-letter at
MaxDeliveryCount, scheduled messages invisible until their time, and duplicate detection on MessageId (which the
simulation can make fail, to deliver a true duplicate).

Small and single-threaded on purpose: localdev/service_bus_model.py is the full model; this one only has to be driven
step by step by the simulation's scheduler, which also decides when a lock is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOCK_DURATION_S = 300.0  # localdev/service_bus_queues.json: PT5M
LOCK_RENEWAL_S = 300.0  # host.json maxAutoLockRenewalDuration
LOCK_RENEWAL_LEAD_S = 10.0  # the last renewal comes a little before the renewal window ends
DUPLICATE_WINDOW_S = 7200.0  # PT2H on the refresh queue


@dataclass
class Message:
    """One message of a queue."""

    seq: int
    queue: str
    message_id: str
    event: Any  # the CloudEvent it carries
    visible_at: float
    delivery_count: int = 1
    locked_by: int | None = None  # the delivery holding its lock
    lock_until: float = 0.0
    settled: bool = False
    dead_lettered: bool = False
    duplicate: bool = False  # sent again with a MessageId duplicate detection should have dropped
    deliveries: list[int] = field(default_factory=list)


class Bus:
    """The queues: `send`, `schedule`, receive (`available`, `lock`), settle (`complete`, `abandon`) and the lock
    clock (`expire_locks`)."""

    def __init__(self, max_delivery_count: int) -> None:
        self.max_delivery_count = max_delivery_count
        self.messages: list[Message] = []
        self._seen: dict[tuple[str, str], float] = {}  # (queue, MessageId) -> when accepted
        self.dropped: list[tuple[str, str]] = []

    def send(
        self, queue: str, message_id: str, event: Any, now: float, at: float | None = None, *, dup: bool = False
    ) -> bool:
        """Accept a message (at `at`: a scheduled one), False when duplicate detection drops it. `dup`: duplicate
        detection fails to see this one (a fault)."""
        key = (queue, message_id)
        if queue.endswith("refresh-requested") and not dup:
            seen = self._seen.get(key)
            if seen is not None and now - seen < DUPLICATE_WINDOW_S:
                self.dropped.append(key)
                return False
        self._seen.setdefault(key, now)
        visible = max(now, at or now)
        self.messages.append(Message(len(self.messages), queue, message_id, event, visible, duplicate=dup))
        return True

    def available(self, now: float) -> list[Message]:
        """Messages a receiver may take now, in sequence order."""
        return [m for m in self.messages if not m.settled and m.locked_by is None and m.visible_at <= now]

    def lock(self, message: Message, delivery: int, now: float) -> None:
        """Hand `message` to `delivery` under a peek-lock, renewed by the host until the renewal window ends."""
        message.locked_by = delivery
        message.lock_until = now + LOCK_RENEWAL_S - LOCK_RENEWAL_LEAD_S + LOCK_DURATION_S
        message.deliveries.append(delivery)

    def holds_lock(self, message: Message, delivery: int) -> bool:
        """`delivery` still holds the message's lock (else its settlement fails: MessageLockLost)."""
        return message.locked_by == delivery and not message.settled

    def complete(self, message: Message, delivery: int) -> None:
        """Complete under a live lock (a lost lock: nothing, the message is delivered again)."""
        if self.holds_lock(message, delivery):
            message.settled = True
            message.locked_by = None

    def abandon(self, message: Message, delivery: int, now: float) -> None:
        """Abandon under a live lock: DeliveryCount + 1, or dead-lettered at MaxDeliveryCount."""
        if self.holds_lock(message, delivery):
            self._unlock(message, now)

    def lose_lock(self, message: Message, now: float) -> None:
        """The lock ends now (renewal failed, or the host died and it ran out): redelivered."""
        if message.locked_by is not None and not message.settled:
            self._unlock(message, now)

    def crashed(self, message: Message, delivery: int, now: float) -> None:
        """The holder died: nobody renews the lock any more, it runs out a lock duration after the last renewal."""
        if self.holds_lock(message, delivery):
            message.lock_until = min(message.lock_until, now + LOCK_DURATION_S)

    def expire_locks(self, now: float) -> list[Message]:
        """Locks that ran out by `now`: each message is delivered again (or dead-lettered). Returns them."""
        expired = [m for m in self.messages if m.locked_by is not None and not m.settled and m.lock_until <= now]
        for message in expired:
            self._unlock(message, now)
        return expired

    def next_time(self, now: float) -> float | None:
        """The next time something happens on its own: a scheduled message shows, a lock runs out."""
        times = [m.visible_at for m in self.messages if not m.settled and m.locked_by is None and m.visible_at > now]
        times += [m.lock_until for m in self.messages if m.locked_by is not None and not m.settled]
        return min(times, default=None)

    def pending(self) -> int:
        """Messages not settled (quiescent: 0)."""
        return sum(1 for m in self.messages if not m.settled)

    def _unlock(self, message: Message, now: float) -> None:
        message.locked_by = None
        if message.delivery_count >= self.max_delivery_count:
            message.settled = message.dead_lettered = True  # MaxDeliveryCountExceeded
            return
        message.delivery_count += 1
        message.visible_at = now
