"""Scheduled deliveries of the local host (DeliveryScheduler): the local counterpart of Service Bus
scheduled messages, for refresh requests with a `notBefore` and for the retries of transient failures.
Durable: a message waits in RabbitMQ, never in memory only."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika

from localdev.broker import (
    BROKER_CONNECTION_ERRORS,
    RECONNECT_INITIAL_S,
    RECONNECT_MAX_S,
    connection_parameters,
    describe_connection_error,
    persistent_copy,
)
from shared.events import CONTENT_TYPE, CloudEvent
from shared.secrets import Scrubber
from shared.settings import Settings
from shared.times import format_time, parse_time

logger = logging.getLogger(__name__)

# Scheduled deliveries (DeliveryScheduler): refresh requests with a notBefore, retries of transient failures.
DUE_SUFFIX = ".due"  # <queue>.due: where the schedule delivers, consumed ahead of <queue> (LocalHost)
SCHEDULED_SUFFIX = ".scheduled"  # <refresh queue>.scheduled: where they wait, held by the releasing thread
NOT_BEFORE_TOLERANCE_MS = 10  # a request due within this is handed to the function at once
# Held (unacknowledged) at most this long before it is due; further off, a message waits in delay queues.
# Well under RabbitMQ's consumer_timeout (30 min by default), which closes a channel that holds one longer.
HOLD_MAX_S = 600.0
DELAY_QUEUE_MAX_S = 2**17  # the longest delay queue (~36 h); a message due later hops through it again
SCHEDULE_PREFETCH = 20_000  # messages the releasing thread may hold at once
SCHEDULE_IDLE_WAIT_S = 0.5  # the releasing thread looks at stop()/requests at least this often
SCHEDULE_ANSWER_TIMEOUT_S = 2.0  # pending() counts 1 when the releasing thread does not answer within this
SCHEDULE_POLL_S = 0.05  # `run --once` looks again this often while scheduled deliveries are pending
# A message that left a delay queue is briefly in neither queue (dead-lettering): pending() counts 1 for
# this long after it last saw a delay queue hold anything.
DELAY_QUEUE_SETTLE_S = 0.25
DUE_HEADER = "x-deliver-at"  # epoch ms: when a message waiting in the schedule is due
RELEASED_HEADER = "x-released-at"  # epoch ms: on a message the schedule delivered; it is never deferred again
# The MessageId a message would have on Service Bus, where it is not the one the event gives (a retry's), for the
# local host's duplicate detection (localdev.local_host.service_bus_message_id_of).
SERVICE_BUS_MESSAGE_ID_HEADER = "x-service-bus-message-id"
# A publish to the schedule that a fresh connection (which declares the queues again) may get through.
_REPUBLISHABLE = (*BROKER_CONNECTION_ERRORS, pika.exceptions.UnroutableError)


class _CountRequest:
    """pending()'s question to the releasing thread, and its answer."""

    def __init__(self) -> None:
        self._answered = threading.Event()
        self.count = 0

    def answer(self, count: int) -> None:
        self.count = count
        self._answered.set()

    def wait(self, timeout: float) -> int | None:
        return self.count if self._answered.wait(timeout) else None


class DeliveryScheduler:
    """Deliver a message to the function's queue at a given time: the local host's counterpart of Service
    Bus scheduled messages, for refresh requests with a `notBefore` (LocalHost.invoke defers them) and for
    the retries of transient failures (it is the host's RetryScheduler). The one place that delivers later.

    A message to deliver later is published (persistent, publisher confirms) with its due time in epoch ms
    in the `x-deliver-at` header to `<queue>.scheduled`; when it is due further than `hold_max_s` away, to
    a durable delay queue `<queue>.scheduled.delay-<2^k>s` instead, whose queue TTL dead-letters it back
    into `<queue>.scheduled` (it hops until it is within `hold_max_s`). The releasing thread (start/stop,
    a connection of its own) consumes `<queue>.scheduled` with a large prefetch, holds each message
    unacknowledged in a heap by due time, and when one is due publishes it (confirmed) to the function's
    queue, then acks it. Nothing waits in memory only: a host that dies leaves its held messages
    unacknowledged and RabbitMQ hands them to the next host, which releases them at their time. A message
    is held at most `hold_max_s`, well within RabbitMQ's consumer_timeout (30 min by default), which
    closes a channel that keeps a message unacknowledged longer.

    A released message carries `x-released-at` (the host never defers it again) and none of the broker's
    bookkeeping headers (x-death, x-delivery-count): the function's queue counts its deliveries afresh.
    The publishing side is thread-safe (invocation threads defer and retry through one connection)."""

    def __init__(
        self,
        settings: Settings,
        target_queue: str,
        *,
        hold_max_s: float = HOLD_MAX_S,
        prefetch: int = SCHEDULE_PREFETCH,
        scrub: Scrubber | None = None,
        accepts: Callable[[str], bool] | None = None,
        forget: Callable[[str], None] | None = None,
    ):
        self._settings = settings
        # The target queue's duplicate detection, asked when a retry is scheduled (as Service Bus checks a
        # scheduled message when it is sent): False drops the retry. None: no duplicate detection. `forget` takes
        # back an accepted MessageId whose send failed.
        self._accepts = accepts
        self._forget = forget
        self.target = target_queue
        # Released messages go to <queue>.due, which the host consumes alongside <queue>: a due request
        # never waits behind a flood of new ones still to be scheduled.
        self.release_queue = target_queue + DUE_SUFFIX
        self.queue = target_queue + SCHEDULED_SUFFIX
        self.hold_max_ms = hold_max_s * 1000
        self.prefetch = prefetch
        self._scrub = scrub
        # Delay queues: 2^k s, from the largest power of two <= hold_max_s / 2 (the smallest a hop can
        # need) up to DELAY_QUEUE_MAX_S. Declared by the releasing thread when it connects, so that it can
        # count what they hold (one left by an earlier host included).
        smallest = max(0, math.floor(math.log2(hold_max_s / 2))) if hold_max_s >= 2 else 0
        self.delays_s = [2**k for k in range(smallest, int(math.log2(DELAY_QUEUE_MAX_S)) + 1)]
        # Publishing side (any thread).
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()
        # Releasing side (its own thread and connection).
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._consumer_connection: Any = None
        self._heap: list[tuple[float, int, int, Any, bytes]] = []  # (due ms, tie-breaker, delivery tag, ...)
        self._sequence = itertools.count()
        self._count_requests: queue.SimpleQueue[_CountRequest] = queue.SimpleQueue()
        self._delayed_seen_at = -math.inf
        self._announced = False
        self._consuming = False
        self._released = threading.Event()

    # Deliver later (any thread) ---------------------------------------------------------------------

    def delay_queue(self, seconds: int) -> str:
        return f"{self.queue}.delay-{seconds}s"

    def deliver_later(self, body: bytes, properties: Any, due_ms: int) -> str:
        """Have this message delivered to the function's queue at `due_ms` (epoch ms); returns the queue it
        waits in. Returns once the broker has it (publisher confirms)."""
        scheduled = _copy_properties(properties, {DUE_HEADER: int(due_ms)})
        with self._lock:
            try:
                return self._publish_later(self._open(), body, scheduled, due_ms, self._declared)
            except _REPUBLISHABLE:
                self._reset()  # the broker dropped the connection (or a queue): once more, on a fresh one
            try:
                return self._publish_later(self._open(), body, scheduled, due_ms, self._declared)
            except _REPUBLISHABLE:
                self._reset()
                raise

    def schedule_retry(self, event: CloudEvent, retry: int, at: datetime, attempt_round: int = 0) -> None:
        """RetryScheduler: deliver `event` to its function's queue again at `at`. The copy keeps the request's
        message id; its Service Bus MessageId, new to duplicate detection as on Azure, goes in a header (see
        retry_message_id). Dropped when the queue's duplicate detection (`accepts`) saw that MessageId already."""
        message_id = retry_message_id(event, retry, attempt_round)
        if self._accepts is not None and not self._accepts(message_id):
            return
        properties = pika.BasicProperties(
            message_id=event.id,
            content_type=CONTENT_TYPE,
            type=event.type,
            headers={SERVICE_BUS_MESSAGE_ID_HEADER: message_id},
        )
        try:
            where = self.deliver_later(event.to_json(), properties, math.ceil(at.timestamp() * 1000))
        except Exception:
            if self._forget is not None:
                self._forget(message_id)  # not sent: the next send of this copy must not be dropped as a duplicate
            raise
        logger.debug("Retry %d of message %s scheduled for %s in %s", retry, event.id, format_time(at), where)

    def _route(self, due_ms: float) -> str:
        """Where a message due at `due_ms` waits: held (the scheduled queue) when due within hold_max_s, else
        the longest delay queue that leaves it due at least hold_max_s / 2 after it (never early)."""
        remaining_ms = due_ms - wall_clock_ms()
        if remaining_ms <= self.hold_max_ms:
            return self.queue
        room_s = (remaining_ms - self.hold_max_ms / 2) / 1000
        fitting = [seconds for seconds in self.delays_s if seconds <= room_s]
        return self.delay_queue(fitting[-1]) if fitting else self.queue

    def _publish_later(self, channel: Any, body: bytes, properties: Any, due_ms: float, declared: set[str]) -> str:
        target = self._route(due_ms)
        if target != self.queue and target not in declared:
            self._declare_delay_queue(channel, target)
            declared.add(target)
        channel.basic_publish("", target, body, properties, mandatory=True)
        return target

    def _declare_delay_queue(self, channel: Any, name: str) -> Any:
        seconds = int(name.rsplit("-", 1)[1].removesuffix("s"))
        return channel.queue_declare(
            name,
            durable=True,
            arguments={
                "x-message-ttl": seconds * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
            },
        )

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._reset()
            self._connection = pika.BlockingConnection(connection_parameters(self._settings))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()  # a message is only scheduled once the broker has it
            self._channel.queue_declare(self.queue, durable=True)
        return self._channel

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._declared = set()
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def close_publisher(self) -> None:
        with self._lock:
            self._reset()

    # Release on time (the releasing thread) ------------------------------------------------------------

    def start(self) -> None:
        """Start the releasing thread (once; it reconnects on its own until stop())."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="local-host-schedule", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the releasing thread; the messages it held go back to the scheduled queue (unacknowledged)."""
        self._stopping.set()
        self._wake()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def pending(self) -> int:
        """Messages waiting to be delivered: held, in the scheduled queue or in a delay queue (those an
        earlier host left included); never less, maybe more for a moment. The releasing thread counts on
        the channel it consumes from, so a message on its way to it is counted by the queue or already
        held. Counts 1 while the thread cannot answer (not connected yet, reconnecting); 0 when it is not
        running."""
        if self._thread is None or not self._thread.is_alive():
            return 0
        request = _CountRequest()
        self._count_requests.put(request)
        self._wake()
        count = request.wait(SCHEDULE_ANSWER_TIMEOUT_S)
        return 1 if count is None else count

    def wait_for_release(self, timeout: float) -> None:
        """Wait until the releasing thread delivers a message, at most `timeout` seconds."""
        if self._released.wait(timeout):
            self._released.clear()

    def _wake(self) -> None:
        connection = self._consumer_connection
        if connection is not None:
            with contextlib.suppress(Exception):  # closed meanwhile: the thread is not waiting on it
                connection.add_callback_threadsafe(_do_nothing)

    def _run(self) -> None:
        delay = RECONNECT_INITIAL_S
        while not self._stopping.is_set():
            self._consuming = False
            try:
                self._serve()
            except BROKER_CONNECTION_ERRORS as error:  # the host reports a lost broker itself
                logger.debug("Scheduled deliveries: %s; reconnecting", describe_connection_error(error, self._scrub))
            except Exception as error:  # logged; the thread reconnects and goes on
                logger.error(
                    "Scheduled deliveries stopped on an error (%s); reconnecting",
                    describe_connection_error(error, self._scrub),
                )
                logger.debug("scheduled deliveries failure", exc_info=True)
            finally:
                connection, self._consumer_connection = self._consumer_connection, None
                self._heap = []  # what it held goes back to the queue with the connection
                if connection is not None and connection.is_open:
                    with contextlib.suppress(Exception):
                        connection.close()
            delay = RECONNECT_INITIAL_S if self._consuming else min(delay * 2, RECONNECT_MAX_S)
            if self._stopping.wait(delay):
                break

    def _serve(self) -> None:
        connection = pika.BlockingConnection(connection_parameters(self._settings))
        self._consumer_connection = connection
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=self.prefetch)
        waiting = channel.queue_declare(self.queue, durable=True).method.message_count
        declared = set()
        for seconds in self.delays_s:
            name = self.delay_queue(seconds)
            waiting += self._declare_delay_queue(channel, name).method.message_count
            declared.add(name)
        if not self._announced:
            self._announced = True
            if waiting:
                logger.info(
                    "%d scheduled deliveries waiting (refresh requests with a notBefore, retries) in %s and its "
                    "delay queues: each goes to %s at its time",
                    waiting,
                    self.queue,
                    self.target,
                )
        channel.basic_consume(
            self.queue, lambda ch, method, properties, body: self._take(ch, method, properties, body, declared)
        )
        self._consuming = True
        while not self._stopping.is_set():
            self._answer_count_requests(connection, channel)
            self._release_due(channel)
            connection.process_data_events(time_limit=self._wait_s())

    def _take(self, channel: Any, method: Any, properties: Any, body: bytes, declared: set[str]) -> None:
        """A message from the scheduled queue: held until due, or on to a delay queue when due too far away."""
        due_ms = _due_ms(properties, body)
        target = self._route(due_ms)
        if target != self.queue:
            self._publish_later(
                channel, body, _copy_properties(properties, {DUE_HEADER: int(due_ms)}), due_ms, declared
            )
            channel.basic_ack(method.delivery_tag)
            logger.debug(
                "Scheduled message %s (due %s) waits in %s", properties.message_id, format_epoch_ms(due_ms), target
            )
            return
        heapq.heappush(self._heap, (due_ms, next(self._sequence), method.delivery_tag, properties, body))
        logger.debug("Scheduled message %s held until %s", properties.message_id, format_epoch_ms(due_ms))

    def _release_due(self, channel: Any) -> None:
        while self._heap and self._heap[0][0] <= (now := wall_clock_ms()):
            due_ms, _, tag, properties, body = heapq.heappop(self._heap)
            released = _copy_properties(properties, {RELEASED_HEADER: int(now)})
            try:
                channel.basic_publish("", self.release_queue, body, released, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
                logger.error(
                    "Could not deliver scheduled message %s to %s (%s); trying again in 1 s",
                    properties.message_id,
                    self.release_queue,
                    describe_connection_error(error, self._scrub),
                )
                heapq.heappush(self._heap, (now + 1000, next(self._sequence), tag, properties, body))
                continue
            channel.basic_ack(tag)
            self._released.set()
            logger.debug(
                "Scheduled message %s delivered to %s %.1f ms after its time",
                properties.message_id,
                self.release_queue,
                wall_clock_ms() - due_ms,
            )

    def _answer_count_requests(self, connection: Any, channel: Any) -> None:
        requests = []
        with contextlib.suppress(queue.Empty):
            while True:
                requests.append(self._count_requests.get_nowait())
        if not requests:
            return
        delayed = sum(
            channel.queue_declare(self.delay_queue(s), passive=True).method.message_count for s in self.delays_s
        )
        # Counted after the delay queues: a message that left one meanwhile is in the scheduled queue
        # already, or still on its way (dead-lettering; covered by DELAY_QUEUE_SETTLE_S).
        ready = channel.queue_declare(self.queue, passive=True).method.message_count
        # A message taken from the queue before that count is on its way to this channel: one more round
        # trip on the channel (the broker's channel sends deliveries it got before our next method ahead
        # of that method's answer), then the deliveries are handled (held) below.
        channel.basic_qos(prefetch_count=self.prefetch)
        connection.process_data_events(time_limit=0)
        now = time.monotonic()
        if delayed:
            self._delayed_seen_at = now
        settling = int(now - self._delayed_seen_at < DELAY_QUEUE_SETTLE_S)
        for request in requests:
            request.answer(len(self._heap) + ready + delayed + settling)

    def _wait_s(self) -> float:
        if not self._heap:
            return SCHEDULE_IDLE_WAIT_S
        return min(SCHEDULE_IDLE_WAIT_S, max(0.0, (self._heap[0][0] - wall_clock_ms()) / 1000))


def retry_message_id(event: CloudEvent, retry: int, attempt_round: int) -> str:
    """The MessageId Service Bus sends retry `retry` of round `attempt_round` with (ServiceBusTransport.schedule_retry):
    neither the event id nor an earlier retry's, which the queue's duplicate detection would drop."""
    return f"{event.id}.retry-{attempt_round}.{retry}"


def _do_nothing() -> None:
    """Wakes a connection's thread (add_callback_threadsafe) so it looks at its requests."""


def wall_clock_ms() -> float:
    return time.time() * 1000


def format_epoch_ms(epoch_ms: float) -> str:
    return format_time(datetime.fromtimestamp(epoch_ms / 1000, UTC))


def not_before_ms(body: bytes) -> int | None:
    """A refresh request's `data.notBefore` in epoch ms (rounded up: never early), None when the body has
    none or is not JSON with a valid one (the function judges such a message). Cheap for the usual body:
    it is parsed only when it mentions notBefore."""
    if b'"notBefore"' not in body:
        return None
    try:
        value = json.loads(body)["data"]["notBefore"]
        return math.ceil(parse_time(value).timestamp() * 1000) if isinstance(value, str) else None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError):
        return None


def _due_ms(properties: Any, body: bytes) -> float:
    """When a message in the schedule is due: its x-deliver-at header, else its notBefore, else now."""
    due = (properties.headers or {}).get(DUE_HEADER)
    if isinstance(due, int) and not isinstance(due, bool):
        return float(due)
    not_before = not_before_ms(body)
    return float(not_before) if not_before is not None else wall_clock_ms()


# The broker's own headers (dead-lettering, quorum queue deliveries) and the schedule's: not carried over.
_NOT_COPIED_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count", DUE_HEADER, RELEASED_HEADER)


def _copy_properties(properties: Any, headers: dict[str, Any]) -> pika.BasicProperties:
    """A persistent copy of a message's properties (message id, type, content type...) with these headers
    in place of the broker's and the schedule's."""
    kept = {k: v for k, v in (properties.headers or {}).items() if not k.startswith(_NOT_COPIED_HEADERS)}
    return persistent_copy(properties, kept | headers)
