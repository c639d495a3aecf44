"""A deterministic model of what Azure Service Bus queues do, and of the Azure Functions Service Bus trigger's
processor that consumes them. No broker usable by the SDK can run here, so the tests and the local tooling run on
this model instead; every rule below is Microsoft's documented behaviour, not a guess at the implementation.

The broker (ServiceBusModel), per queue of localdev/service_bus_queues.json (queue_properties):
- Duplicate detection: the MessageId of every accepted message is remembered for the history window; a message
  sent again with a remembered MessageId is reported accepted and dropped, whatever became of the first one.
  Scheduled messages count, at schedule time. (localdev/duplicate_detection.py does the remembering.)
  https://learn.microsoft.com/azure/service-bus-messaging/duplicate-detection
- Peek-lock: a received message is locked for the queue's lockDuration; complete / abandon / dead-letter need a
  live lock, renew-lock extends it to now + lockDuration. An expired lock is an abandon: the message "pops back up
  at or near the front of the retrieval order" (here: sequence order) and its DeliveryCount grows by one.
  https://learn.microsoft.com/azure/service-bus-messaging/message-transfers-locks-settlement
  https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebusreceivedmessage.deliverycount
  ("This value starts at 1 ... incremented when a message lock expires, or the message is explicitly abandoned")
- maxDeliveryCount: "A message is automatically deadlettered after this number of deliveries", reason
  MaxDeliveryCountExceeded; time to live: expired messages are dropped, or dead-lettered with reason
  TTLExpiredException when deadLetteringOnMessageExpiration is set; the queue's defaultMessageTimeToLive is also a
  ceiling for a message's own TimeToLive; a locked message does not expire until its lock ends (then at once), and
  a message completed under lock stays completed.
  https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.administration.queueproperties.maxdeliverycount
  https://learn.microsoft.com/azure/service-bus-messaging/service-bus-dead-letter-queues
  https://learn.microsoft.com/azure/service-bus-messaging/message-expiration
- Scheduled messages: invisible until their scheduled enqueue time (which becomes their EnqueuedTime, the start of
  their time to live); the sender gets a sequence number, which cancels them. When its time comes a scheduled
  message is appended to the queue with a new sequence number, behind what was sent before.
  https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebussender.schedulemessageasync
  https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebussender.cancelscheduledmessageasync
  https://learn.microsoft.com/azure/service-bus-messaging/message-sequencing
- Refused sends: over 256 KB on the Standard tier ("The message size includes the size of properties (system and
  user) and the size of payload"), a MessageId or SessionId over 128 characters, a message without SessionId on a
  session-enabled queue. https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas
- Sessions: a session-enabled queue hands a session (its messages, in order) to one holder at a time.
  https://learn.microsoft.com/azure/service-bus-messaging/message-sessions

The processor (simulate_processor), as host.json "extensions.serviceBus" configures it
(https://learn.microsoft.com/azure/azure-functions/functions-bindings-service-bus): up to maxConcurrentCalls
handlers without sessions; with sessions up to maxConcurrentSessions sessions, one handler each
(MaxConcurrentCallsPerSession "The default value is 1"), each waiting sessionIdleTimeout for the session's next
message before closing it ("the maximum amount of time to wait for a message to be received for the currently
active session. After this time has elapsed, the processor will close the session and attempt to process another
session. If not specified, the TryTimeout will be used", 60 s by default). Locks are renewed for
maxAutoLockRenewalDuration ("This value should be greater than the longest message lock duration").
https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebussessionprocessoroptions.sessionidletimeout
https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebussessionprocessoroptions.maxconcurrentcallspersession
https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebusprocessoroptions

Simplifications, each stated where it applies: sessions have no lock of their own (a holder keeps its session until
it releases it; the processor model releases it when the session's lock would be lost); the dead-letter queue is a
list; partitioning, deferral, transactions, topics and the Basic tier are not modelled.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import StrictBool, StrictInt, TypeAdapter

from localdev.duplicate_detection import DuplicateDetection

QUEUES_FILE = Path(__file__).resolve().parent / "service_bus_queues.json"

MAX_ID_LENGTH = 128  # MessageId and SessionId (Service Bus quotas)
DEFAULT_DUPLICATE_DETECTION_WINDOW = timedelta(minutes=10)  # "This value defaults to 10 minutes"
SDK_TRY_TIMEOUT = timedelta(seconds=60)  # the SDK's default TryTimeout: the session idle timeout when none is set
# The SDK renews a lock shortly before it ends, not at the last instant: modelled as this long before (at most half
# the lock duration), so a lock is lost slightly before maxAutoLockRenewalDuration + lockDuration.
LOCK_RENEWAL_LEAD = timedelta(seconds=10)
TTL_EXPIRED = "TTLExpiredException"
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"


def _wall_clock() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class QueueProperties:
    """One queue's properties, with Service Bus's defaults (Standard tier)."""

    name: str
    max_delivery_count: int = 10
    lock_duration: timedelta = timedelta(minutes=1)
    requires_session: bool = False
    duplicate_detection_window: timedelta | None = None  # None = duplicate detection off
    # The portal's proposal; the API's default is TimeSpan.MaxValue ("never"), which queues created without
    # defaultMessageTimeToLive get (CreateQueueOptions.DefaultMessageTimeToLive).
    default_message_ttl: timedelta = timedelta(days=14)
    dead_lettering_on_message_expiration: bool = False
    max_message_size_bytes: int = 256 * 1024  # Standard tier


_DURATION = TypeAdapter(timedelta)
_INT = TypeAdapter(StrictInt)
_BOOL = TypeAdapter(StrictBool)
# JSON key (the ARM/CLI property name) -> (QueueProperties field, parser)
_SIMPLE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "maxDeliveryCount": ("max_delivery_count", _INT.validate_python),
    "lockDuration": ("lock_duration", _DURATION.validate_python),
    "requiresSession": ("requires_session", _BOOL.validate_python),
    "defaultMessageTimeToLive": ("default_message_ttl", _DURATION.validate_python),
    "deadLetteringOnMessageExpiration": ("dead_lettering_on_message_expiration", _BOOL.validate_python),
    "maxMessageSizeInKilobytes": ("max_message_size_bytes", lambda value: _INT.validate_python(value) * 1024),
}
_DUPLICATE_KEYS = ("requiresDuplicateDetection", "duplicateDetectionHistoryTimeWindow")


def _queue_from_json(name: str, spec: dict[str, Any]) -> QueueProperties:
    unknown = set(spec) - set(_SIMPLE_KEYS) - set(_DUPLICATE_KEYS)
    if unknown:  # a misspelt key would silently leave a default in place
        raise ValueError(f"queue {name!r}: unknown properties {sorted(unknown)}")
    values: dict[str, Any] = {
        attribute: parse(spec[key]) for key, (attribute, parse) in _SIMPLE_KEYS.items() if key in spec
    }
    if _BOOL.validate_python(spec.get("requiresDuplicateDetection", False)):
        window = spec.get("duplicateDetectionHistoryTimeWindow")
        values["duplicate_detection_window"] = (
            DEFAULT_DUPLICATE_DETECTION_WINDOW if window is None else _DURATION.validate_python(window)
        )
    properties = QueueProperties(name=name, **values)
    if properties.max_delivery_count < 1:
        raise ValueError(f"queue {name!r}: maxDeliveryCount must be at least 1")
    for duration in (properties.lock_duration, properties.default_message_ttl, properties.duplicate_detection_window):
        if duration is not None and duration <= timedelta(0):
            raise ValueError(f"queue {name!r}: durations must be positive")
    return properties


def queue_properties(overrides: dict[str, dict] | None = None, path: Path = QUEUES_FILE) -> dict[str, QueueProperties]:
    """Every queue of the file; ISO 8601 durations parsed with pydantic (TypeAdapter(timedelta)). `overrides`
    maps queue name -> {json key: value} e.g. {"integration.token.refresh-requested": {"maxDeliveryCount": 3}},
    as scripts/deploy.sh overrides the file's values from settings."""
    queues: dict[str, dict[str, Any]] = json.loads(path.read_text("utf-8"))["queues"]
    overrides = overrides or {}
    unknown = set(overrides) - set(queues)
    if unknown:
        raise KeyError(f"overrides for queues that {path.name} does not have: {sorted(unknown)}")
    return {name: _queue_from_json(name, {**spec, **overrides.get(name, {})}) for name, spec in queues.items()}


# -------------------------------------------------------------------------------------------- messages, deliveries


class MessageRefusedError(Exception):
    """The broker refused a send (the SDK raises e.g. MessageSizeExceededError, or InvalidOperationError for a
    message without SessionId on a session queue): the sender learns it, unlike a dropped duplicate."""


class MessageLockLostError(Exception):
    """Settling or renewing a delivery whose lock expired: the message was, or will be, delivered again."""


class SessionNotHeldError(Exception):
    """Receiving from, or releasing, a session the caller does not hold: only the holder sees a session's messages."""


@dataclass
class ModelMessage:
    """What a sender gives the broker."""

    body: bytes
    message_id: str
    session_id: str | None = None
    content_type: str | None = None
    application_properties: dict = field(default_factory=dict)
    time_to_live: timedelta | None = None

    @classmethod
    def of_sdk_message(cls, message: Any) -> ModelMessage:
        """The model's copy of an azure.servicebus.ServiceBusMessage (its body is an iterable of bytes sections)."""
        return cls(
            body=b"".join(message.body),
            message_id=str(message.message_id),
            session_id=message.session_id,
            content_type=message.content_type,
            application_properties=dict(message.application_properties or {}),
            time_to_live=message.time_to_live,
        )

    @property
    def size_bytes(self) -> int:
        """Approximately what the quota counts: payload plus user and system properties."""
        properties = sum(len(str(key)) + len(str(value)) for key, value in self.application_properties.items())
        system = len(self.message_id) + len(self.session_id or "") + len(self.content_type or "")
        return len(self.body) + properties + system


@dataclass
class Delivery:
    """One locked delivery handed to a receiver; `locked_until` moves when the lock is renewed."""

    queue: str
    message: ModelMessage
    sequence_number: int
    delivery_count: int  # 1 on the first delivery (as the SDK/Functions show it)
    enqueued_time: datetime
    lock_token: str
    locked_until: datetime


@dataclass
class DeadLettered:
    """A message in a queue's dead-letter queue, with the broker's (or the receiver's) reason."""

    message: ModelMessage
    sequence_number: int
    delivery_count: int
    reason: str  # "MaxDeliveryCountExceeded", "TTLExpiredException", or the reason given to dead_letter()
    description: str


@dataclass
class _Entry:
    """A message the queue holds: scheduled, visible (ready), or locked by a receiver."""

    message: ModelMessage
    sequence_number: int
    visible_at: datetime  # the (scheduled) enqueue time
    time_to_live: timedelta
    scheduled: bool
    deliveries: int = 0
    lock_token: str | None = None
    locked_until: datetime | None = None
    ready: bool = False  # in its ready heap, receivable

    @property
    def expires_at(self) -> datetime:
        return self.visible_at + self.time_to_live


class _Queue:
    """One queue's state. Heaps are lazy: an item whose entry changed since is skipped when it surfaces."""

    def __init__(self, properties: QueueProperties, clock: Callable[[], datetime]) -> None:
        self.properties = properties
        window = properties.duplicate_detection_window
        self.duplicates = None if window is None else DuplicateDetection(window, clock)
        self.entries: dict[int, _Entry] = {}
        self.ready: dict[str | None, list[int]] = {}  # session id (None without sessions) -> sequence numbers
        self.scheduled_heap: list[tuple[datetime, int]] = []
        self.lock_heap: list[tuple[datetime, int, str]] = []
        self.expiry_heap: list[tuple[datetime, int]] = []
        self.scheduled = 0
        self.held: dict[str, str] = {}  # session id -> holder
        self.dead: list[DeadLettered] = []
        self.dropped: list[ModelMessage] = []
        self.dropped_scheduled: set[int] = set()  # sequence numbers given to scheduled duplicates
        self.sequence = itertools.count(1)

    def session_key(self, message: ModelMessage) -> str | None:
        return message.session_id if self.properties.requires_session else None


# ---------------------------------------------------------------------------------------------------------- broker


class ServiceBusModel:
    """The broker: queues with duplicate detection, peek-lock, delivery counts, dead-lettering, time to live,
    scheduled messages and sessions. Deterministic on a given clock; thread-safe (one RLock)."""

    def __init__(
        self,
        queues: Iterable[QueueProperties] | dict[str, QueueProperties],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._clock = clock or _wall_clock
        properties = queues.values() if isinstance(queues, dict) else queues
        self._queues = {queue.name: _Queue(queue, self._clock) for queue in properties}
        self._lock = threading.RLock()
        self._lock_tokens = itertools.count(1)

    # ------------------------------------------------------------------------------------------------ sending

    def send(self, queue: str, message: ModelMessage) -> bool:
        """True when the queue accepted the message; False when duplicate detection dropped it (the real sender is
        told it succeeded). Raises MessageRefusedError for what the broker rejects, KeyError for an unknown queue."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            ttl = self._check_acceptable(q, message)
            if q.duplicates is not None and not q.duplicates.first_time(message.message_id):
                q.dropped.append(message)
                return False
            entry = _Entry(message, next(q.sequence), self._clock(), ttl, scheduled=False)
            q.entries[entry.sequence_number] = entry
            self._make_ready(q, entry)
            return True

    def schedule(self, queue: str, message: ModelMessage, at: datetime) -> int:
        """The sequence number of a message that stays invisible until `at`. Duplicate detection applies now, on
        its MessageId: a dropped duplicate still gets a number but is never delivered."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            ttl = self._check_acceptable(q, message)
            sequence_number = next(q.sequence)
            if q.duplicates is not None and not q.duplicates.first_time(message.message_id):
                q.dropped.append(message)
                q.dropped_scheduled.add(sequence_number)
                return sequence_number
            q.entries[sequence_number] = _Entry(message, sequence_number, at, ttl, scheduled=True)
            q.scheduled += 1
            heapq.heappush(q.scheduled_heap, (at, sequence_number))
            self.expire_locks()  # a time already past enqueues it at once
            return sequence_number

    def cancel_scheduled(self, queue: str, sequence_number: int) -> None:
        """Removes a message still waiting for its time. Nothing happens for a dropped duplicate's number; a number
        that is no scheduled message (anymore) raises KeyError, as the broker answers "message not found"."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            if sequence_number in q.dropped_scheduled:
                return  # the sender cannot tell a dropped duplicate from an accepted message
            entry = q.entries.get(sequence_number)
            if entry is None or not entry.scheduled:
                raise KeyError(f"{queue}: message {sequence_number} is not scheduled")
            del q.entries[sequence_number]
            q.scheduled -= 1

    # ---------------------------------------------------------------------------------------------- receiving

    def receive(self, queue: str, session_id: str | None = None, holder: str | None = None) -> Delivery | None:
        """The next visible, unlocked message in sequence order, now locked for the queue's lock duration; None
        when there is none. On a session queue `session_id` is required and must be held (accept_session), by
        `holder` when given (SessionNotHeldError otherwise)."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            if q.properties.requires_session:
                if session_id is None or session_id not in q.held:
                    raise SessionNotHeldError(f"{queue}: receiving needs a session accepted first")
                if holder is not None and q.held[session_id] != holder:
                    raise SessionNotHeldError(f"{queue}: session {session_id!r} is held by {q.held[session_id]!r}")
            elif session_id is not None:
                raise ValueError(f"{queue} is not session-enabled: receive without a session id")
            entry = self._pop_ready(q, session_id if q.properties.requires_session else None)
            if entry is None:
                return None
            now = self._clock()
            entry.deliveries += 1
            entry.lock_token = f"lock-{next(self._lock_tokens)}"
            entry.locked_until = now + q.properties.lock_duration
            heapq.heappush(q.lock_heap, (entry.locked_until, entry.sequence_number, entry.lock_token))
            return Delivery(
                queue=queue,
                message=entry.message,
                sequence_number=entry.sequence_number,
                delivery_count=entry.deliveries,
                enqueued_time=entry.visible_at,
                lock_token=entry.lock_token,
                locked_until=entry.locked_until,
            )

    def accept_session(self, queue: str, holder: str) -> str | None:
        """The id of an available session (it has a visible message and nobody holds it), now held by `holder`;
        None when there is none. Sessions are offered in the order their messages became visible."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            if not q.properties.requires_session:
                raise ValueError(f"{queue} is not session-enabled")
            chosen, emptied = None, []
            for session_id, heap in q.ready.items():
                if session_id in q.held:
                    continue
                self._drop_stale_ready(q, heap)
                if heap:
                    chosen = session_id
                    break
                emptied.append(session_id)
            for session_id in emptied:
                del q.ready[session_id]
            if chosen is not None:
                q.held[chosen] = holder
            return chosen

    def release_session(self, queue: str, session_id: str, holder: str) -> None:
        """Gives the session back: any holder may accept it next. Its locked messages keep their locks."""
        with self._lock:
            q = self._queues[queue]
            if q.held.get(session_id) != holder:
                raise SessionNotHeldError(f"{queue}: {holder!r} does not hold session {session_id!r}")
            del q.held[session_id]

    def renew_lock(self, delivery: Delivery) -> datetime:
        """Extends the lock to now + the queue's lock duration (also on `delivery`); MessageLockLostError when it
        already expired."""
        with self._lock:
            q, entry = self._locked_entry(delivery)
            entry.locked_until = delivery.locked_until = self._clock() + q.properties.lock_duration
            heapq.heappush(q.lock_heap, (entry.locked_until, entry.sequence_number, delivery.lock_token))
            return entry.locked_until

    def complete(self, delivery: Delivery) -> None:
        """Removes the message; MessageLockLostError when the lock expired (the message was or will be redelivered),
        even though the receiver's work is done."""
        with self._lock:
            q, entry = self._locked_entry(delivery)
            del q.entries[entry.sequence_number]

    def abandon(self, delivery: Delivery) -> None:
        """Unlocks the message for redelivery (DeliveryCount + 1 on its next delivery); dead-lettered with reason
        MaxDeliveryCountExceeded when it already had max_delivery_count deliveries."""
        with self._lock:
            q, entry = self._locked_entry(delivery)
            self._unlock(q, entry)

    def dead_letter(self, delivery: Delivery, reason: str, description: str = "") -> None:
        """Moves the message to the dead-letter queue with the receiver's reason."""
        with self._lock:
            q, entry = self._locked_entry(delivery)
            self._dead_letter(q, entry, reason, description)

    # -------------------------------------------------------------------------------------------------- state

    def expire_locks(self) -> None:
        """Brings every queue up to the clock; every operation calls it first. Scheduled messages whose time came
        become visible; an expired lock counts as an abandon (DeliveryCount + 1, dead-lettered at the maximum);
        a message past its time to live is dropped, or dead-lettered (TTLExpiredException) when the queue says so."""
        with self._lock:
            now = self._clock()
            for q in self._queues.values():
                while q.scheduled_heap and q.scheduled_heap[0][0] <= now:
                    _, sequence_number = heapq.heappop(q.scheduled_heap)
                    entry = q.entries.pop(sequence_number, None)
                    if entry is not None and entry.scheduled:
                        # "appended to the queue as if it had been enqueued at the current instant, which includes
                        # assigning a new SequenceNumber" (message-sequencing)
                        entry.scheduled = False
                        entry.sequence_number = next(q.sequence)
                        q.entries[entry.sequence_number] = entry
                        q.scheduled -= 1
                        self._make_ready(q, entry)
                    elif entry is not None:
                        q.entries[sequence_number] = entry
                while q.lock_heap and q.lock_heap[0][0] <= now:
                    locked_until, sequence_number, token = heapq.heappop(q.lock_heap)
                    entry = q.entries.get(sequence_number)
                    if entry is not None and entry.lock_token == token and entry.locked_until == locked_until:
                        self._unlock(q, entry)
                while q.expiry_heap and q.expiry_heap[0][0] <= now:
                    _, sequence_number = heapq.heappop(q.expiry_heap)
                    entry = q.entries.get(sequence_number)
                    if entry is not None and entry.ready:  # a locked message expires when its lock ends (_unlock)
                        entry.ready = False
                        self._expire(q, entry)

    def active_count(self, queue: str) -> int:
        """Messages visible or locked, not scheduled (what the portal calls active)."""
        with self._lock:
            self.expire_locks()
            q = self._queues[queue]
            return len(q.entries) - q.scheduled

    def scheduled_count(self, queue: str) -> int:
        """Messages waiting for their scheduled enqueue time."""
        with self._lock:
            self.expire_locks()
            return self._queues[queue].scheduled

    def dead_letters(self, queue: str) -> list[DeadLettered]:
        """The queue's dead-letter queue, oldest first."""
        with self._lock:
            self.expire_locks()
            return list(self._queues[queue].dead)

    def dropped_duplicates(self, queue: str) -> list[ModelMessage]:
        """What duplicate detection dropped (the real broker keeps no such list; tests need it to show what
        happened)."""
        with self._lock:
            return list(self._queues[queue].dropped)

    @property
    def queues(self) -> dict[str, QueueProperties]:
        """Every queue's properties, by name."""
        return {name: q.properties for name, q in self._queues.items()}

    def properties(self, queue: str) -> QueueProperties:
        """The queue's properties (KeyError for a queue the model does not have)."""
        return self._queues[queue].properties

    def held_sessions(self, queue: str) -> dict[str, str]:
        """Session id -> holder, for the sessions held now."""
        with self._lock:
            return dict(self._queues[queue].held)

    def next_due(self) -> datetime | None:
        """The earliest scheduled enqueue time or lock expiry of any queue: when a driver that advances a virtual
        clock has something to look at next. None when nothing is scheduled or locked."""
        with self._lock:
            due: list[datetime] = []
            for q in self._queues.values():
                while q.scheduled_heap:
                    at, sequence_number = q.scheduled_heap[0]
                    entry = q.entries.get(sequence_number)
                    if entry is not None and entry.scheduled:
                        due.append(at)
                        break
                    heapq.heappop(q.scheduled_heap)
                while q.lock_heap:
                    locked_until, sequence_number, token = q.lock_heap[0]
                    entry = q.entries.get(sequence_number)
                    if entry is not None and entry.lock_token == token and entry.locked_until == locked_until:
                        due.append(locked_until)
                        break
                    heapq.heappop(q.lock_heap)
            return min(due, default=None)

    # ------------------------------------------------------------------------------------------------ inside

    def _check_acceptable(self, q: _Queue, message: ModelMessage) -> timedelta:
        """The message's time to live on this queue, or MessageRefusedError for what the broker rejects."""
        name = q.properties.name
        if q.properties.requires_session and message.session_id is None:
            raise MessageRefusedError(f"{name} requires sessions: a message without SessionId is refused")
        if len(message.message_id) > MAX_ID_LENGTH or len(message.session_id or "") > MAX_ID_LENGTH:
            raise MessageRefusedError(f"{name}: MessageId and SessionId are at most {MAX_ID_LENGTH} characters")
        if message.size_bytes > q.properties.max_message_size_bytes:
            raise MessageRefusedError(
                f"{name}: message of {message.size_bytes} bytes over the {q.properties.max_message_size_bytes}"
            )
        if message.time_to_live is not None and message.time_to_live <= timedelta(0):
            raise MessageRefusedError(f"{name}: a time to live must be positive")
        ttl = q.properties.default_message_ttl
        return ttl if message.time_to_live is None else min(message.time_to_live, ttl)  # the queue's is a ceiling

    def _make_ready(self, q: _Queue, entry: _Entry) -> None:
        entry.ready = True
        heapq.heappush(q.ready.setdefault(q.session_key(entry.message), []), entry.sequence_number)
        heapq.heappush(q.expiry_heap, (entry.expires_at, entry.sequence_number))
        if entry.expires_at <= self._clock():
            entry.ready = False
            self._expire(q, entry)

    @staticmethod
    def _drop_stale_ready(q: _Queue, heap: list[int]) -> None:
        while heap:
            entry = q.entries.get(heap[0])
            if entry is not None and entry.ready:
                return
            heapq.heappop(heap)

    def _pop_ready(self, q: _Queue, key: str | None) -> _Entry | None:
        heap = q.ready.get(key)
        if not heap:
            return None
        self._drop_stale_ready(q, heap)
        if not heap:
            if key is not None:
                del q.ready[key]
            return None
        entry = q.entries[heapq.heappop(heap)]
        entry.ready = False
        return entry

    def _locked_entry(self, delivery: Delivery) -> tuple[_Queue, _Entry]:
        self.expire_locks()
        q = self._queues[delivery.queue]
        entry = q.entries.get(delivery.sequence_number)
        if entry is None or entry.lock_token != delivery.lock_token:
            raise MessageLockLostError(
                f"{delivery.queue}: the lock of message {delivery.sequence_number} "
                f"(delivery {delivery.delivery_count}) expired"
            )
        return q, entry

    def _unlock(self, q: _Queue, entry: _Entry) -> None:
        """An abandon or an expired lock: dead-letter at the maximum, expire when past its time, else redeliver."""
        entry.lock_token = entry.locked_until = None
        if entry.deliveries >= q.properties.max_delivery_count:
            self._dead_letter(
                q, entry, MAX_DELIVERY_COUNT_EXCEEDED, "Message couldn't be consumed after maximum delivery attempts."
            )
        elif entry.expires_at <= self._clock():
            self._expire(q, entry)
        else:
            self._make_ready(q, entry)

    def _expire(self, q: _Queue, entry: _Entry) -> None:
        if q.properties.dead_lettering_on_message_expiration:
            self._dead_letter(q, entry, TTL_EXPIRED, "The message expired and was dead lettered.")
        else:
            del q.entries[entry.sequence_number]

    @staticmethod
    def _dead_letter(q: _Queue, entry: _Entry, reason: str, description: str) -> None:
        del q.entries[entry.sequence_number]
        q.dead.append(DeadLettered(entry.message, entry.sequence_number, entry.deliveries, reason, description))


# ------------------------------------------------------------------------------------------------------- processor


class VirtualClock:
    """Time that moves only when told to: hours of broker time run in milliseconds, the same way every run.
    Pass `clock.now` as the model's clock."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        if start.tzinfo is None:
            raise ValueError("a VirtualClock runs on aware UTC datetimes")
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The current virtual time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Moves time forward by `seconds` (never back)."""
        if seconds < 0:
            raise ValueError("a VirtualClock does not go back")
        with self._lock:
            self._now += timedelta(seconds=seconds)

    def advance_to(self, when: datetime) -> None:
        """Moves time forward to `when`; a time already past leaves the clock where it is."""
        with self._lock:
            self._now = max(self._now, when)


_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?$")


def parse_timespan(text: str) -> timedelta:
    """A .NET TimeSpan as host.json writes it: [d.]hh:mm:ss[.fffffff], e.g. "00:00:01", "00:00:00.80"."""
    match = _TIMESPAN.match(text.strip())
    if match is None:
        raise ValueError(f"not a TimeSpan ([d.]hh:mm:ss[.fffffff]): {text!r}")
    days, hours, minutes, seconds, fraction = match.groups()
    if int(minutes) > 59 or int(seconds) > 59 or int(hours) > 23:
        raise ValueError(f"not a TimeSpan (hours < 24, minutes and seconds < 60): {text!r}")
    return timedelta(
        days=int(days or 0),
        hours=int(hours),
        minutes=int(minutes),
        seconds=int(seconds) + (float(f"0.{fraction}") if fraction else 0.0),
    )


@dataclass(frozen=True)
class ProcessorOptions:
    """host.json "extensions.serviceBus": what the Functions Service Bus trigger's processor does per instance.
    (The defaults are the SDK processors' per-instance values; the Functions extension may scale its own defaults
    with the CPU count, so the app's host.json sets what it relies on.)"""

    max_concurrent_calls: int = 16
    max_concurrent_sessions: int = 8
    session_idle_timeout: timedelta | None = None  # None -> the SDK uses TryTimeout (60 s)
    max_auto_lock_renewal_duration: timedelta = timedelta(minutes=5)
    auto_complete_messages: bool = True
    try_timeout: timedelta = SDK_TRY_TIMEOUT  # "clientRetryOptions": {"tryTimeout"}: the idle timeout when unset

    @property
    def effective_session_idle_timeout(self) -> timedelta:
        """How long a session processor waits for a session's next message: sessionIdleTimeout, else TryTimeout."""
        return self.session_idle_timeout or self.try_timeout

    @classmethod
    def from_host_json(cls, path: Path) -> ProcessorOptions:
        """The options a host.json gives; keys it leaves out keep their defaults."""
        service_bus = json.loads(path.read_text("utf-8")).get("extensions", {}).get("serviceBus", {})
        defaults = cls()
        idle = service_bus.get("sessionIdleTimeout")
        renewal = service_bus.get("maxAutoLockRenewalDuration")
        try_timeout = service_bus.get("clientRetryOptions", {}).get("tryTimeout")
        return cls(
            max_concurrent_calls=_INT.validate_python(
                service_bus.get("maxConcurrentCalls", defaults.max_concurrent_calls)
            ),
            max_concurrent_sessions=_INT.validate_python(
                service_bus.get("maxConcurrentSessions", defaults.max_concurrent_sessions)
            ),
            session_idle_timeout=None if idle is None else parse_timespan(idle),
            max_auto_lock_renewal_duration=(
                defaults.max_auto_lock_renewal_duration if renewal is None else parse_timespan(renewal)
            ),
            auto_complete_messages=_BOOL.validate_python(
                service_bus.get("autoCompleteMessages", defaults.auto_complete_messages)
            ),
            try_timeout=defaults.try_timeout if try_timeout is None else parse_timespan(try_timeout),
        )


@dataclass(frozen=True)
class ProcessorRun:
    """What one simulated Functions instance did while it emptied a queue."""

    messages_handled: int  # messages a handler completed
    handler_invocations: int  # deliveries handed to a handler (a redelivery is one more)
    elapsed_seconds: float  # virtual time from the start to the last handler's end
    max_concurrent_handlers: int
    deliveries_per_message: dict[str, int]  # MessageId -> deliveries handed to a handler
    lost_lock_completions: int  # handlers that ended after their lock was lost (their message went to another)
    sessions_accepted: int

    @property
    def throughput(self) -> float:
        """Messages handled per virtual second."""
        return self.messages_handled / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


@dataclass
class _Handler:
    slot: int
    delivery: Delivery
    received_at: datetime
    done_at: datetime
    finished: bool = False


@dataclass
class _Slot:
    name: str
    session_id: str | None = None
    handler: _Handler | None = None
    idle_deadline: datetime | None = None  # when a held session with no message to give is closed


class _ProcessorSimulation:
    """A discrete-event simulation of the trigger's processor on a VirtualClock; see simulate_processor."""

    def __init__(
        self,
        *,
        model: ServiceBusModel,
        queue: str,
        options: ProcessorOptions,
        handler_seconds: Callable[[Delivery], float],
        clock: VirtualClock,
        sessions: bool,
        cpu_seconds: Callable[[Delivery], float] | None,
        worker_processes: int,
    ) -> None:
        properties = model.properties(queue)
        if sessions != properties.requires_session:
            raise ValueError(f"{queue}: sessions={sessions} but requires_session={properties.requires_session}")
        self.model, self.queue, self.options, self.clock, self.sessions = model, queue, options, clock, sessions
        self.handler_seconds, self.cpu_seconds = handler_seconds, cpu_seconds
        self.idle_timeout = options.effective_session_idle_timeout
        self.renewal_lead = min(LOCK_RENEWAL_LEAD, properties.lock_duration / 2)
        slot_count = options.max_concurrent_sessions if sessions else options.max_concurrent_calls
        self.slots = [_Slot(f"slot-{index}") for index in range(slot_count)]
        self.start = self.last_done = clock.now()
        self.cpu_free_at = [self.start] * worker_processes  # each worker process runs one handler's CPU part at once
        self.events: list[tuple[datetime, int, str, _Handler]] = []
        self.event_order = itertools.count()
        self.running = self.max_running = self.invocations = self.handled = self.lost = self.accepted = 0
        self.deliveries: dict[str, int] = {}

    def run(self) -> ProcessorRun:
        while True:
            for index, slot in enumerate(self.slots):
                self._fill(index, slot)
            if (
                not self.running
                and not self.model.active_count(self.queue)
                and not self.model.scheduled_count(self.queue)
            ):
                break
            self._advance()
        for slot in self.slots:  # leave the model as a closing processor would: no session held
            if slot.session_id is not None:
                self.model.release_session(self.queue, slot.session_id, slot.name)
        return ProcessorRun(
            messages_handled=self.handled,
            handler_invocations=self.invocations,
            elapsed_seconds=(self.last_done - self.start).total_seconds(),
            max_concurrent_handlers=self.max_running,
            deliveries_per_message=self.deliveries,
            lost_lock_completions=self.lost,
            sessions_accepted=self.accepted,
        )

    def _fill(self, index: int, slot: _Slot) -> None:
        """A free slot takes the next message: without sessions from the queue; with sessions from the session it
        holds (one at a time), else from a session it accepts. A held session with nothing to give starts the
        slot's idle timer."""
        if slot.handler is not None:
            return
        if not self.sessions:
            delivery = self.model.receive(self.queue)
            if delivery is not None:
                self._start(index, slot, delivery)
            return
        if slot.session_id is None:
            slot.session_id = self.model.accept_session(self.queue, slot.name)
            if slot.session_id is None:
                return
            self.accepted += 1
        delivery = self.model.receive(self.queue, slot.session_id, slot.name)
        if delivery is not None:
            slot.idle_deadline = None
            self._start(index, slot, delivery)
        elif slot.idle_deadline is None:
            slot.idle_deadline = self.clock.now() + self.idle_timeout

    def _start(self, index: int, slot: _Slot, delivery: Delivery) -> None:
        now = self.clock.now()
        begins = now
        if self.cpu_seconds is not None:  # the handler's CPU part waits for a free worker process (the GIL)
            worker = min(range(len(self.cpu_free_at)), key=self.cpu_free_at.__getitem__)
            begins = max(now, self.cpu_free_at[worker]) + timedelta(seconds=self.cpu_seconds(delivery))
            self.cpu_free_at[worker] = begins
        handler = _Handler(index, delivery, now, begins + timedelta(seconds=self.handler_seconds(delivery)))
        slot.handler = handler
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.invocations += 1
        self.deliveries[delivery.message.message_id] = self.deliveries.get(delivery.message.message_id, 0) + 1
        self._push(handler.done_at, "done", handler)
        self._plan_lock(handler)

    def _plan_lock(self, handler: _Handler) -> None:
        """The processor renews the lock shortly before it ends while within maxAutoLockRenewalDuration of the
        receive; past that, a handler still running loses the lock when it ends (with sessions: the session)."""
        locked_until = handler.delivery.locked_until
        renew_at = locked_until - self.renewal_lead
        renewal_ends = handler.received_at + self.options.max_auto_lock_renewal_duration
        if renew_at < handler.done_at and renew_at <= renewal_ends:
            self._push(renew_at, "renew", handler)
        elif locked_until <= handler.done_at and self.sessions:
            self._push(locked_until, "lock_lost", handler)

    def _push(self, at: datetime, kind: str, handler: _Handler) -> None:
        heapq.heappush(self.events, (at, next(self.event_order), kind, handler))

    def _advance(self) -> None:
        """Moves the clock to the next thing that happens and lets it happen."""
        candidates = [slot.idle_deadline for slot in self.slots if slot.idle_deadline is not None]
        if self.events:
            candidates.append(self.events[0][0])
        due = self.model.next_due()
        if due is not None:
            candidates.append(due)
        if not candidates:
            raise RuntimeError(f"{self.queue}: messages remain that no slot can receive (sessions held elsewhere?)")
        self.clock.advance_to(min(candidates))
        now = self.clock.now()
        while self.events and self.events[0][0] <= now:
            _, _, kind, handler = heapq.heappop(self.events)
            if handler.finished:
                continue
            if kind == "done":
                self._finish(handler)
            elif kind == "renew":
                self.model.renew_lock(handler.delivery)
                self._plan_lock(handler)
            else:  # "lock_lost": the session lock goes with it; another slot may accept the session
                self._lose_session(self.slots[handler.slot])
        for slot in self.slots:
            if slot.idle_deadline is not None and slot.idle_deadline <= now:
                slot.idle_deadline = None
                self._lose_session(slot)

    def _finish(self, handler: _Handler) -> None:
        """The handler returns: the message is completed (auto-complete; without it the function completes it
        itself, the same for the broker), unless its lock was lost meanwhile."""
        handler.finished = True
        self.running -= 1
        self.last_done = self.clock.now()
        slot = self.slots[handler.slot]
        slot.handler = None
        try:
            self.model.complete(handler.delivery)
            self.handled += 1
        except MessageLockLostError:
            self.lost += 1
            self._lose_session(slot)

    def _lose_session(self, slot: _Slot) -> None:
        if slot.session_id is not None:
            self.model.release_session(self.queue, slot.session_id, slot.name)
            slot.session_id = None


def simulate_processor(  # noqa: PLR0917 - the signature the tests and the bench code against
    model: ServiceBusModel,
    queue: str,
    options: ProcessorOptions,
    handler_seconds: Callable[[Delivery], float],
    clock: VirtualClock,
    sessions: bool,
    *,
    cpu_seconds: Callable[[Delivery], float] | None = None,
    worker_processes: int = 1,
) -> ProcessorRun:
    """One Functions instance consuming `queue` until it is empty, simulated on `clock` (the model's clock).

    Without sessions up to max_concurrent_calls handlers run at once, a freed slot receiving the next message at
    once. With sessions (the queue requires them) up to max_concurrent_sessions slots each accept an available
    session and handle its messages one at a time; after each message a slot waits session_idle_timeout (None: the
    client's TryTimeout, 60 s by default) for the session's next one, then closes the session and accepts another.
    A handler takes handler_seconds(delivery) of virtual time, then its message is completed. Locks are renewed for
    max_auto_lock_renewal_duration: a handler running past that plus the lock duration loses its lock, and the
    message is delivered again (DeliveryCount + 1) while the first handler still runs; its completion then fails.

    `cpu_seconds` adds a CPU part before each handler's handler_seconds that needs one of `worker_processes`
    (FUNCTIONS_WORKER_PROCESS_COUNT): Python code holds the worker's GIL, so CPU parts run one at a time per
    process, however many handlers the host runs at once."""
    if worker_processes < 1:
        raise ValueError("worker_processes must be at least 1")
    simulation = _ProcessorSimulation(
        model=model,
        queue=queue,
        options=options,
        handler_seconds=handler_seconds,
        clock=clock,
        sessions=sessions,
        cpu_seconds=cpu_seconds,
        worker_processes=worker_processes,
    )
    return simulation.run()
