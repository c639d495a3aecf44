"""One `publish` for every event: Azure Service Bus and the bridge to the platform's RabbitMQ.

Transports are created once per worker process (see `shared.runtime`) and are safe to use from
several invocation threads at once: pika connections and Service Bus senders are not thread-safe,
so each transport serialises its own sends behind a lock.

Delivery is at-least-once: when a transport fails, `publish` raises, the triggering message is
retried, and events that already reached the other transport are sent again with the same ids.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
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
}


class PublishError(RuntimeError):
    """At least one transport could not take the events. The message gives no secrets."""


class EventTransport(Protocol):
    name: str

    def send(self, events: Sequence[CloudEvent]) -> None: ...

    def close(self) -> None: ...


class EventPublisher:
    """Sends every event to every configured transport."""

    def __init__(self, transports: Sequence[EventTransport]):
        if not transports:
            raise SettingsError(
                "No event transport is configured: set ServiceBusConnection (or "
                "ServiceBusConnection__fullyQualifiedNamespace) and/or RABBITMQ_URL."
            )
        self.transports = list(transports)

    def publish(self, events: Iterable[CloudEvent]) -> int:
        batch = list(events)
        if not batch:
            return 0
        failures = []
        for transport in self.transports:
            try:
                transport.send(batch)
            except Exception as error:
                logger.exception("Publishing %d event(s) to %s failed", len(batch), transport.name)
                failures.append(f"{transport.name}: {error.__class__.__name__}")
        if failures:
            raise PublishError(f"could not publish {len(batch)} event(s) ({', '.join(failures)})")
        return len(batch)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


# RabbitMQ ---------------------------------------------------------------------------------------


class RabbitMqTransport:
    """Publishes to a durable topic exchange with publisher confirms; reconnects after a drop."""

    name = "rabbitmq"

    def __init__(self, url: str, exchange: str, connect: Callable[[], Any] | None = None):
        import pika  # imported here so a Service-Bus-only worker never loads it

        self._pika = pika
        self._exchange = exchange
        self._parameters = pika.URLParameters(url)
        # A broker under a memory alarm blocks publishers; fail the invocation instead of hanging.
        self._parameters.blocked_connection_timeout = 30
        self._parameters.socket_timeout = 10
        self._connect = connect or (lambda: pika.BlockingConnection(self._parameters))
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self.connections_opened = 0

    def send(self, events: Sequence[CloudEvent]) -> None:
        errors = self._pika.exceptions
        with self._lock:
            # One reconnect covers a connection the broker or a network device dropped while idle.
            for attempt in (1, 2):
                try:
                    channel = self._ensure_channel()
                    for event in events:
                        channel.basic_publish(
                            exchange=self._exchange,
                            routing_key=event.type,
                            body=event.to_json(),
                            properties=self._pika.BasicProperties(
                                content_type=CONTENT_TYPE,
                                message_id=event.id,
                                type=event.type,
                                delivery_mode=self._pika.DeliveryMode.Persistent,
                            ),
                        )
                    return
                except (errors.AMQPConnectionError, errors.AMQPChannelError, errors.StreamLostError) as error:
                    self._reset()
                    if attempt == 2:
                        raise
                    logger.warning("RabbitMQ connection lost (%s); reconnecting", error.__class__.__name__)

    def _ensure_channel(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            if self._connection is None or not self._connection.is_open:
                self._connection = self._connect()
                self.connections_opened += 1
            self._channel = self._connection.channel()
            self._channel.exchange_declare(self._exchange, exchange_type="topic", durable=True)
            self._channel.confirm_delivery()
        return self._channel

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
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
    """Sends events as batches to the queue named after their type."""

    name = "service-bus"

    def __init__(self, client: Any):
        self._client = client
        self._senders: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
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

    def send(self, events: Sequence[CloudEvent]) -> None:
        from azure.servicebus import ServiceBusMessage
        from azure.servicebus.exceptions import MessageSizeExceededError

        by_queue: dict[str, list[CloudEvent]] = {}
        for event in events:
            by_queue.setdefault(SERVICE_BUS_QUEUES[event.type], []).append(event)
        for queue, queue_events in by_queue.items():
            sender, lock = self._sender(queue)
            with lock:
                batch = sender.create_message_batch()
                for event in queue_events:
                    message = ServiceBusMessage(
                        event.to_json(),
                        message_id=event.id,
                        content_type=CONTENT_TYPE,
                        application_properties={"type": event.type},
                        session_id=session_id(event),
                    )
                    try:
                        batch.add_message(message)
                    except MessageSizeExceededError:
                        # Batch full: send it and start the next one with this message.
                        sender.send_messages(batch)
                        batch = sender.create_message_batch()
                        batch.add_message(message)
                if len(batch):
                    sender.send_messages(batch)

    def _sender(self, queue: str) -> tuple[Any, threading.Lock]:
        with self._registry_lock:
            if queue not in self._senders:
                self._senders[queue] = self._client.get_queue_sender(queue)
                self._locks[queue] = threading.Lock()
            return self._senders[queue], self._locks[queue]

    def close(self) -> None:
        with self._registry_lock:
            for sender in self._senders.values():
                sender.close()
            self._senders.clear()
            self._client.close()


def session_id(event: CloudEvent) -> str | None:
    """Refresh requests of one connection share a Service Bus session, so the session-enabled
    refresh queue hands them to one invocation at a time (README "Failure handling")."""
    if event.type != REFRESH_REQUESTED:
        return None
    data = event.data
    return connection_key(str(data["tenantId"]), str(data["integrationId"]), str(data["connectionId"]))


def publisher_from_settings(settings: Settings) -> EventPublisher:
    transports: list[EventTransport] = []
    if settings.service_bus_configured:
        transports.append(ServiceBusTransport.from_settings(settings))
    if settings.rabbitmq_url is not None:
        transports.append(RabbitMqTransport(settings.rabbitmq_url.get_secret_value(), settings.rabbitmq_exchange))
    return EventPublisher(transports)
