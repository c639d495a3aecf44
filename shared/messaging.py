"""One `publish` for every event: Azure Service Bus and the bridge to the platform's RabbitMQ.

Transports are created once per worker process (see `shared.runtime`) and are safe to use from
several invocation threads at once: pika connections and Service Bus senders are not thread-safe,
so only one thread at a time uses a connection or sender -- and that thread also sends what other
threads queued meanwhile, so concurrent invocations share round trips instead of waiting in line.

Delivery is at-least-once: when a transport fails, `publish` raises, the triggering message is
retried, and events that already reached the other transport are sent again with the same ids.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from shared.events import CHECK_EXPIRING, CONTENT_TYPE, REFRESH_REQUESTED, CloudEvent
from shared.settings import Settings, SettingsError
from shared.state_store import connection_key

logger = logging.getLogger(__name__)

# Service Bus queue per event type. The two trigger queues are required; the outcome queues let
# Service Bus consumers follow results too (they must exist when Service Bus is configured).
SERVICE_BUS_QUEUES = {
    CHECK_EXPIRING: CHECK_EXPIRING,
    REFRESH_REQUESTED: REFRESH_REQUESTED,
    "integration.token.refreshed": "integration.token.refreshed",
    "integration.token.refresh.failed": "integration.token.refresh.failed",
    "integration.token.refresh.systemic-failure": "integration.token.refresh.systemic-failure",
}


class PublishError(RuntimeError):
    """At least one transport could not take the events. The message says which, where (host:port,
    namespace) and what to check; it gives no secrets. `errors`: each failed transport's error;
    `details`: one line per failed transport."""

    def __init__(self, message: str, errors: dict[str, BaseException] | None = None, details: str = ""):
        super().__init__(message)
        self.errors = errors or {}
        self.details = details or message


class UnroutableEvents(PublishError):
    """RabbitMQ returned events published as mandatory: no queue is bound for their routing key."""

    def __init__(self, message: str, exchange: str, routing_keys: Sequence[str]):
        super().__init__(message)
        self.exchange = exchange
        self.routing_keys = list(routing_keys)


class EventTransport(Protocol):
    name: str

    def send(self, events: Sequence[CloudEvent]) -> None: ...

    def close(self) -> None: ...


class RetryScheduler(Protocol):
    """Delivers a refresh request again later, on the queue that triggers the refresh function."""

    def schedule_retry(self, event: CloudEvent, retry: int, at: datetime, attempt_round: int = 0) -> None: ...


class EventPublisher:
    """Sends every event to every configured transport."""

    def __init__(self, transports: Sequence[EventTransport]):
        if not transports:
            raise SettingsError(
                "No event transport is configured: set ServiceBusConnection (or "
                "ServiceBusConnection__fullyQualifiedNamespace) and/or RABBITMQ_URL."
            )
        self.transports = list(transports)

    @property
    def retry_scheduler(self) -> RetryScheduler | None:
        """The transport that triggers the functions and can schedule a message (Service Bus)."""
        return next((t for t in self.transports if isinstance(t, ServiceBusTransport)), None)

    def publish(self, events: Iterable[CloudEvent]) -> int:
        batch = list(events)
        if not batch:
            return 0
        failures, errors = [], {}
        for transport in self.transports:
            try:
                transport.send(batch)
            except Exception as error:
                # Not logged here: whoever handles the PublishError reports it once, and its text
                # names every failed transport. The traceback only at debug level.
                logger.debug("Publishing %d event(s) to %s failed", len(batch), transport.name, exc_info=True)
                errors[transport.name] = error
                describe = getattr(transport, "describe_error", None)
                failures.append(f"{transport.name}: {describe(error) if describe else error.__class__.__name__}")
        if failures:
            details = "; ".join(failures)
            raise PublishError(f"could not publish {len(batch)} event(s) ({details})", errors, details)
        return len(batch)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


# RabbitMQ ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Batch:
    """The events of one `send` call, followed until the broker confirmed every one of them."""

    events: Sequence[CloudEvent]
    unconfirmed: int = 0
    nacked: int = 0
    returned: list[str] = field(default_factory=list)  # routing keys of events returned unroutable
    attempts: int = 0
    done: bool = False
    error: BaseException | None = None


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
        # mandatory: an event no queue is bound for is returned and `send` raises UnroutableEvents.
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
        self.connections_opened = 0

    def send(self, events: Sequence[CloudEvent]) -> None:
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
            raise UnroutableEvents(
                f"{len(batch.returned)} of {len(batch.events)} event(s) returned unroutable: no queue is bound to "
                f"exchange '{self._exchange}' for routing key {', '.join(keys)}",
                self._exchange,
                keys,
            )

    @property
    def where(self) -> str:
        return f"{self._parameters.host}:{self._parameters.port}"

    def describe_error(self, error: BaseException) -> str:
        """One line for a failed send: what failed, where (host:port, never the URL) and what to check."""
        errors = self._pika.exceptions
        if isinstance(error, UnroutableEvents):
            return f"UnroutableEvents at {self.where}: {error}"
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
        """Publish what is queued and wait for confirms until `mine` is settled; after a lost
        connection, queue the unconfirmed batches again (once each: one reconnect per send)."""
        errors = self._pika.exceptions
        had_connection = self._connection is not None
        try:
            self._publish_queued()
            self._await_confirms(lambda: mine.done)
        except (errors.AMQPConnectionError, errors.AMQPChannelError, errors.StreamLostError) as error:
            unsettled = {id(batch): batch for batch in [*self._in_flight.values(), mine] if not batch.done}
            self._reset()
            for batch in unsettled.values():
                batch.attempts += 1
                if batch.attempts >= 2:
                    batch.error, batch.done = error, True  # its sender raises; it is not published later
                elif batch not in self._queued:
                    batch.unconfirmed = batch.nacked = 0
                    batch.returned = []
                    self._queued.appendleft(batch)
            if not mine.done:
                # A connection that could not be made is tried once more in silence: if that fails
                # too, the PublishError says so (one line, not two).
                logger.log(
                    logging.WARNING if had_connection else logging.DEBUG,
                    "RabbitMQ connection %s (%s); reconnecting",
                    "lost" if had_connection else "could not be made",
                    error.__class__.__name__,
                )

    def _publish_queued(self) -> None:
        channel = self._ensure_channel()
        half_window = self._confirm_window // 2
        while self._queued:
            batch = self._queued.popleft()
            if batch.done:  # failed while queued (the connection could not be made): not sent at all
                continue
            for event in batch.events:
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
                self._in_flight[self._next_tag] = batch
                batch.unconfirmed += 1
                self._next_tag += 1
                if len(self._in_flight) >= self._confirm_window:
                    self._await_confirms(lambda: len(self._in_flight) <= half_window)
            if not batch.events:
                batch.done = True

    def _await_confirms(self, settled: Callable[[], bool]) -> None:
        if settled():
            return
        timed_out: list[bool] = []
        timer = self._connection.call_later(self._confirm_timeout_s, lambda: timed_out.append(True))
        try:
            # Blocks on the socket (no polling) until enough acks arrived, the timer fired, or the
            # connection closed -- the same wait pika's blocking channel uses internally.
            self._connection._flush_output(settled, lambda: timed_out)
        finally:
            self._connection.remove_timeout(timer)
        if not self._connection.is_open:
            raise self._pika.exceptions.StreamLostError("connection closed while waiting for publisher confirms")
        if not settled():
            raise self._pika.exceptions.AMQPConnectionError("no publisher confirms within the timeout")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [method.delivery_tag]
        if method.multiple:
            tags = [tag for tag in self._in_flight if tag <= method.delivery_tag]
        for tag in tags:
            batch = self._in_flight.pop(tag, None)
            if batch is None:
                continue
            if method.NAME == "Basic.Nack":
                batch.nacked += 1
            batch.unconfirmed -= 1
            batch.done = batch.unconfirmed == 0

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

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._in_flight = {}
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                logger.debug("closing a broken RabbitMQ connection failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._reset()


# Service Bus ------------------------------------------------------------------------------------


class ServiceBusTransport:
    """Sends events as batches to the queue named after their type.

    A queue's sender is used by one thread at a time. Like the RabbitMQ transport, concurrent sends
    share the round trip: each queues its events, and the thread holding the sender sends
    everything queued for that queue in as few message batches as fit.
    """

    name = "service-bus"

    def __init__(self, client: Any):
        self._client = client
        self._senders: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._queued: dict[str, deque[_Batch]] = {}
        self._registry_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceBusTransport:
        from azure.servicebus import ServiceBusClient

        if settings.service_bus_connection_string is not None:
            client = ServiceBusClient.from_connection_string(settings.service_bus_connection_string.get_secret_value())
        else:
            from azure.identity import DefaultAzureCredential

            client = ServiceBusClient(settings.service_bus_namespace, DefaultAzureCredential())
        return cls(client)

    def describe_error(self, error: BaseException) -> str:
        # The class name only: SDK error texts are long and may quote the connection's details.
        namespace = getattr(self._client, "fully_qualified_namespace", None)
        where = f" at {namespace}" if isinstance(namespace, str) else ""
        return (
            f"{error.__class__.__name__}{where}; check the ServiceBusConnection settings and the "
            "Azure Service Bus Data Sender role of the identity"
        )

    def send(self, events: Sequence[CloudEvent]) -> None:
        by_queue: dict[str, list[CloudEvent]] = {}
        for event in events:
            by_queue.setdefault(SERVICE_BUS_QUEUES[event.type], []).append(event)
        for queue, queue_events in by_queue.items():
            sender, lock, queued = self._sender(queue)
            batch = _Batch(queue_events)
            queued.append(batch)
            with lock:
                if not batch.done:
                    self._send_queued(sender, queued)
            if batch.error is not None:
                raise batch.error

    @staticmethod
    def _send_queued(sender: Any, queued: deque[_Batch]) -> None:
        """Send every batch queued for this sender; a failure fails each of them (their senders raise)."""
        from azure.servicebus.exceptions import MessageSizeExceededError

        taken: list[_Batch] = []
        while queued:
            taken.append(queued.popleft())
        try:
            message_batch = sender.create_message_batch()
            for event in (event for batch in taken for event in batch.events):
                message = service_bus_message(event)
                try:
                    message_batch.add_message(message)
                except MessageSizeExceededError:
                    # Batch full: send it and start the next one with this message.
                    sender.send_messages(message_batch)
                    message_batch = sender.create_message_batch()
                    message_batch.add_message(message)
            if len(message_batch):
                sender.send_messages(message_batch)
        except Exception as error:  # noqa: BLE001 - handed to every sender whose events were in it
            for batch in taken:
                batch.error = error
        for batch in taken:
            batch.done = True

    def schedule_retry(self, event: CloudEvent, retry: int, at: datetime, attempt_round: int = 0) -> None:
        """Send `event` again to its queue, to be delivered at `at` (a scheduled message), as retry
        number `retry` of its round. Its message id is the event id + `.retry-ROUND.N`: the queue's
        duplicate detection would drop the event id itself, or an earlier round's retry."""
        queue = SERVICE_BUS_QUEUES[event.type]
        sender, lock, _ = self._sender(queue)
        message = service_bus_message(event)
        message.message_id = f"{event.id}.retry-{attempt_round}.{retry}"
        with lock:
            sender.schedule_messages(message, at)

    def _sender(self, queue: str) -> tuple[Any, threading.Lock, deque[_Batch]]:
        with self._registry_lock:
            if queue not in self._senders:
                self._senders[queue] = self._client.get_queue_sender(queue)
                self._locks[queue] = threading.Lock()
                self._queued[queue] = deque()
            return self._senders[queue], self._locks[queue], self._queued[queue]

    def close(self) -> None:
        with self._registry_lock:
            for sender in self._senders.values():
                sender.close()
            self._senders.clear()
            self._client.close()


def service_bus_message(event: CloudEvent) -> Any:
    """The Service Bus message an event is sent as (DESIGN.md section 3): the CloudEvent as the body,
    its id as message id, its type as application property, and a session for refresh requests."""
    from azure.servicebus import ServiceBusMessage

    return ServiceBusMessage(
        event.to_json(),
        message_id=event.id,
        content_type=CONTENT_TYPE,
        application_properties={"type": event.type},
        session_id=session_id(event),
    )


def session_id(event: CloudEvent) -> str | None:
    """Refresh requests of one connection share a Service Bus session, so the session-enabled
    refresh queue hands them to one invocation at a time (docs/failure-handling.md)."""
    if event.type != REFRESH_REQUESTED:
        return None
    data = event.data
    return connection_key(str(data["tenantId"]), str(data["integrationId"]), str(data["connectionId"]))


def publisher_from_settings(settings: Settings, *, rabbitmq_mandatory: bool = False) -> EventPublisher:
    """The app's publisher. `rabbitmq_mandatory` (operator commands): an event no RabbitMQ queue is
    bound for fails the publish instead of being dropped by the broker."""
    transports: list[EventTransport] = []
    if settings.service_bus_configured:
        transports.append(ServiceBusTransport.from_settings(settings))
    if settings.rabbitmq_url is not None:
        transports.append(
            RabbitMqTransport(
                settings.rabbitmq_url.get_secret_value(), settings.rabbitmq_exchange, mandatory=rabbitmq_mandatory
            )
        )
    return EventPublisher(transports)
