"""The bridge to the platform's RabbitMQ: a topic exchange, routing key = event type, persistent
messages, publisher confirms (docs/events.md).

Created once per worker process and safe to use from several invocation threads at once: a pika
connection is not thread-safe, so one thread at a time drives it -- and that thread also sends what
other threads queued meanwhile, so concurrent invocations share confirm round trips.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import PublishError, UnroutableEventsError
from shared.events import CONTENT_TYPE, CloudEvent
from shared.messaging.publisher import SendBatch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Batch(SendBatch):
    """A send's events as the connection's thread follows them: `published` of them went out on the current
    channel. A batch is done only once every event was published *and* confirmed: an ack with multiple=True
    can settle everything in flight while the rest of a batch larger than the confirm window is still to go."""

    published: int = 0

    def settle_if_confirmed(self) -> None:
        if self.published == len(self.events) and self.unconfirmed == 0:
            self.done = True


class RabbitMqTransport:
    """Publishes to a durable topic exchange with publisher confirms; reconnects after a drop.

    Confirms are windowed: up to `confirm_window` messages are in flight before waiting for the
    broker's acks, instead of one round trip per message (~10x the throughput). pika's blocking
    channel only offers confirm-per-message, so the window is built on its underlying channel
    (`_impl`), driven by the blocking connection's own event loop.

    Concurrent senders share round trips (group commit): a send queues its batch; whichever thread
    holds the connection publishes every queued batch and waits for confirms, which settle the
    other threads' batches too. A persistent message's confirm waits for the broker's disk write
    (milliseconds), so one lock held per round trip would cap all invocation threads together at
    a few hundred events/s.
    """

    name = "rabbitmq"

    def __init__(
        self,
        url: str,
        exchange: str,
        confirm_window: int = 200,
        confirm_timeout_s: float = 30.0,
        *,
        mandatory: bool = False,
    ):
        import pika  # imported here so a Service-Bus-only worker never loads it

        self._pika = pika
        self._exchange = exchange
        # mandatory: an event no queue is bound for is returned and `send` raises UnroutableEventsError.
        # Off for the app: the platform exchange may have no consumer of an event type, which is fine.
        self._mandatory = mandatory
        self._parameters = pika.URLParameters(url)
        self._password = getattr(self._parameters.credentials, "password", None)  # kept out of error texts
        # A broker under a memory alarm blocks publishers; fail the invocation instead of hanging.
        self._parameters.blocked_connection_timeout = 30
        self._parameters.socket_timeout = 10
        # Named, so operators can tell this app's connection apart (rabbitmqctl list_connections, UI).
        self._parameters.client_properties = {"connection_name": "integration-token-refresh"}
        self._confirm_window = max(1, confirm_window)
        self._confirm_timeout_s = confirm_timeout_s
        self._lock = threading.Lock()  # held by the one thread that drives the connection
        self._queued: deque[_Batch] = deque()  # append/popleft are atomic: no lock needed to queue
        self._connection: Any = None
        self._channel: Any = None
        self._next_tag = 1
        self._in_flight: dict[int, _Batch] = {}  # delivery tag -> its batch, until confirmed
        # The batch the connection's thread took from the queue and is publishing: neither queued nor (entirely)
        # in flight, so a failure must settle it too, or its sender would wait for confirms that never come.
        self._publishing: _Batch | None = None
        self.connections_opened = 0

    def send(self, events: Sequence[CloudEvent]) -> None:
        """Publish the events (routing key = event type) and return once the broker confirmed every one.
        Thread-safe; concurrent sends share confirm round trips. After a lost connection or a confirm timeout
        (`confirm_timeout_s`) it reconnects once and publishes the unconfirmed events again (same message ids);
        a second failure raises pika's error. Raises PublishError when the broker nacks, UnroutableEventsError
        for unroutable events when `mandatory`."""
        batch = _Batch(list(events))
        self._queued.append(batch)
        with self._lock:
            while not batch.done:
                self._drive(batch)
        if batch.error is not None:
            raise batch.error
        if batch.nacked:
            raise PublishError(f"RabbitMQ refused {batch.nacked} of {len(batch.events)} event(s) (basic.nack)")
        if batch.returned:
            keys = sorted(set(batch.returned))
            raise UnroutableEventsError(
                f"{len(batch.returned)} of {len(batch.events)} event(s) returned unroutable: no queue is bound to "
                f"exchange '{self._exchange}' for routing key {', '.join(keys)}",
                self._exchange,
                keys,
            )

    @property
    def where(self) -> str:
        """The broker's host:port, for error texts (never the URL: it holds the password)."""
        return f"{self._parameters.host}:{self._parameters.port}"

    def describe_error(self, error: BaseException) -> str:
        """One line for a failed send: what failed, where (host:port, never the URL) and what to check."""
        errors = self._pika.exceptions
        if isinstance(error, UnroutableEventsError):
            return f"UnroutableEventsError at {self.where}: {error}"
        if isinstance(error, PublishError):
            return f"PublishError at {self.where}: {error}"
        reason = self._reason(error)
        detail = f"{error.__class__.__name__} at {self.where}" + (f" ({reason})" if reason else "")
        if isinstance(error, errors.ProbableAuthenticationError | errors.ProbableAccessDeniedError) or (
            "ACCESS_REFUSED" in reason
        ):
            return f"{detail}; check the user, password and vhost in RABBITMQ_URL"
        if isinstance(error, errors.AMQPChannelError):
            return f"{detail}; check RABBITMQ_EXCHANGE '{self._exchange}' and the user's permissions on it"
        if isinstance(error, errors.AMQPConnectionError | errors.StreamLostError | OSError):
            return f"{detail}; check that RabbitMQ is running there and that RABBITMQ_URL is right"
        return detail

    def _reason(self, error: BaseException) -> str:
        """The innermost cause: pika wraps the socket's error in connector errors (in `args` or
        `.exception`) whose str() is often empty."""
        for _ in range(5):
            wrapped = getattr(error, "exception", None)
            inner = wrapped if isinstance(wrapped, BaseException) else None
            inner = inner or next((arg for arg in error.args if isinstance(arg, BaseException)), None)
            if inner is None:
                break
            error = inner
        if isinstance(error, OSError) and error.strerror:
            text = error.strerror
        elif getattr(error, "reply_text", None):
            text = f"{getattr(error, 'reply_code', '')} {error.reply_text}".strip()
        else:
            lines = str(error).strip().splitlines()
            text = lines[0] if lines else ""
        if self._password and len(self._password) >= 4:
            text = text.replace(self._password, "***")
        return text[:200]

    def _drive(self, mine: _Batch) -> None:
        """Publish what is queued and wait for confirms until `mine` is settled. When that fails, every batch
        taken from the queue and not settled -- in flight, or being published -- gets its outcome at once: after
        a lost connection or channel it is queued again (once each: one reconnect per send) or, if it already
        was, fails; an unexpected error fails it. No sender is left waiting for confirms that cannot come."""
        errors = self._pika.exceptions
        had_connection = self._connection is not None
        try:
            self._publish_queued()
            self._await_confirms(lambda: mine.done)
        except (errors.AMQPConnectionError, errors.AMQPChannelError, errors.StreamLostError) as error:
            unsettled = self._unsettled(mine)
            channel_only = isinstance(error, errors.AMQPChannelError)
            if channel_only and self._connection is not None and self._connection.is_open:
                self._drop_channel()  # the connection is fine: a new channel on it
            else:
                self._reset()
            again = []
            for batch in unsettled:
                batch.attempts += 1
                if batch.attempts >= 2:
                    batch.error, batch.done = error, True  # its sender raises; it is not published later
                elif batch not in self._queued:
                    batch.unconfirmed = batch.nacked = batch.published = 0
                    batch.returned = []
                    again.append(batch)
            self._queued.extendleft(reversed(again))  # first in line, in the order they were taken
            if not mine.done:
                # A connection that could not be made is tried once more in silence: if that fails
                # too, the PublishError says so (one line, not two).
                logger.log(
                    logging.WARNING if had_connection else logging.DEBUG,
                    "RabbitMQ %s %s (%s); %s",
                    "channel" if channel_only else "connection",
                    "lost" if had_connection else "could not be made",
                    error.__class__.__name__,
                    "opening a new channel" if self._connection is not None else "reconnecting",
                )
        except Exception as error:  # noqa: BLE001 - unexpected: each sender of a taken batch raises it
            unsettled = self._unsettled(mine)
            self._reset()  # the connection's state is unknown
            for batch in unsettled:
                batch.error, batch.done = error, True
        finally:
            self._publishing = None

    def _unsettled(self, mine: _Batch) -> list[_Batch]:
        """The batches taken from the queue (or `mine`) whose outcome is still open."""
        taken = [*self._in_flight.values(), self._publishing, mine]
        return list({id(batch): batch for batch in taken if batch is not None and not batch.done}.values())

    def _publish_queued(self) -> None:
        channel = self._ensure_channel()
        while self._queued:
            batch = self._queued.popleft()
            if batch.done:  # failed while queued (the connection could not be made): not sent at all
                continue
            self._publishing = batch
            self._publish(channel, batch)
            self._publishing = None
            batch.settle_if_confirmed()

    def _publish(self, channel: Any, batch: _Batch) -> None:
        """Publish the batch's events, waiting for confirms whenever `confirm_window` are in flight. An event
        pika cannot send (basic_publish raises, the connection and channel fine) fails its batch with a
        PublishError; a lost connection or channel is raised (the caller queues the batch again)."""
        errors = self._pika.exceptions
        half_window = self._confirm_window // 2
        for event in batch.events:
            try:
                channel.basic_publish(
                    exchange=self._exchange,
                    routing_key=event.type,
                    mandatory=self._mandatory,
                    body=event.to_json(),
                    properties=self._pika.BasicProperties(
                        content_type=CONTENT_TYPE,
                        message_id=event.id,
                        type=event.type,
                        delivery_mode=self._pika.DeliveryMode.Persistent,
                    ),
                )
            except (errors.AMQPConnectionError, errors.AMQPChannelError):
                raise
            except Exception as error:  # noqa: BLE001 - this batch's own fault (pika marshals before it writes)
                batch.error = PublishError(
                    f"RabbitMQ could not publish event {event.id} (routing key {event.type[:64]!r}): "
                    f"{error.__class__.__name__}: {error}"
                )
                batch.error.__cause__ = error
                batch.done = True  # its published events stay in flight: their confirms settle nothing more
                return
            self._in_flight[self._next_tag] = batch
            batch.unconfirmed += 1
            batch.published += 1
            self._next_tag += 1
            if len(self._in_flight) >= self._confirm_window:
                self._await_confirms(lambda: len(self._in_flight) <= half_window)

    def _await_confirms(self, settled: Callable[[], bool]) -> None:
        if settled():
            return
        timed_out: list[bool] = []
        channel = self._channel
        # A timer of the underlying connection's I/O loop: its callback runs inside _flush_output. (The blocking
        # connection's call_later only runs callbacks from process_data_events: inside _flush_output it never
        # fired, and a confirm that never came was waited for as long as the connection lived.)
        ioloop = self._connection._impl.ioloop
        timer = ioloop.call_later(self._confirm_timeout_s, lambda: timed_out.append(True))
        try:
            # Blocks on the socket (no polling) until enough acks arrived, the timer fired, the channel
            # closed or the connection closed -- the same wait pika's blocking channel uses internally.
            self._connection._flush_output(settled, lambda: timed_out, lambda: not channel.is_open)
        finally:
            ioloop.remove_timeout(timer)
        if not self._connection.is_open:
            raise self._pika.exceptions.StreamLostError("connection closed while waiting for publisher confirms")
        if not settled() and not channel.is_open:
            reason = getattr(channel, "_closing_reason", None)
            if isinstance(reason, self._pika.exceptions.AMQPChannelError):
                raise reason
            raise self._pika.exceptions.ChannelWrongStateError("channel closed while waiting for publisher confirms")
        if not settled():
            raise self._pika.exceptions.AMQPConnectionError("no publisher confirms within the timeout")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [method.delivery_tag]
        if method.multiple:  # every delivery up to this tag, whichever batches (threads) they belong to
            tags = [tag for tag in self._in_flight if tag <= method.delivery_tag]
        for tag in tags:
            batch = self._in_flight.pop(tag, None)
            if batch is None:
                continue
            if method.NAME == "Basic.Nack":
                batch.nacked += 1
            batch.unconfirmed -= 1
            batch.settle_if_confirmed()

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # The broker sends basic.return before the message's confirm: the batch is still in flight.
        for batch in self._in_flight.values():
            if any(event.id == properties.message_id for event in batch.events):
                batch.returned.append(method.routing_key)
                return

    def _ensure_channel(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            if self._connection is None or not self._connection.is_open:
                self._connection = self._pika.BlockingConnection(self._parameters)
                self.connections_opened += 1
            blocking = self._connection.channel()
            blocking.exchange_declare(self._exchange, exchange_type="topic", durable=True)
            if self._mandatory:
                blocking._impl.add_on_return_callback(self._on_return)
            selected: list[Any] = []
            blocking._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
            self._connection._flush_output(lambda: bool(selected))
            # Publishing on the underlying channel does not wait for each confirm; _on_confirm counts them.
            self._channel = blocking._impl
            self._next_tag, self._in_flight = 1, {}
        return self._channel

    def _drop_channel(self) -> None:
        """Forget a closed channel (the connection stays): its unconfirmed deliveries will never be confirmed."""
        channel, self._channel, self._in_flight = self._channel, None, {}
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except Exception:
                logger.debug("closing a broken RabbitMQ channel failed", exc_info=True)

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._in_flight = {}
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                logger.debug("closing a broken RabbitMQ connection failed", exc_info=True)

    def close(self) -> None:
        """Close the connection; a later send connects again."""
        with self._lock:
            self._reset()


# Service Bus ------------------------------------------------------------------------------------
