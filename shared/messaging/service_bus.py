"""Azure Service Bus: every event goes to the queue named after its type, with a MessageId that lets the refresh
queue's duplicate detection absorb true duplicates only (service_bus_message_id; docs/failure-handling.md).

Senders are created once per process and used by one thread at a time; concurrent sends to a queue
share one network send.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.events import CHECK_EXPIRING, CONTENT_TYPE, REFRESH_REQUESTED, CloudEvent
from shared.messaging.publisher import SendBatch
from shared.settings import Settings
from shared.times import parse_time, utc_now

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


def service_bus_client(settings: Settings) -> Any:
    """The one place a ServiceBusClient is built: from the connection string, else with managed
    identity (DefaultAzureCredential) for ServiceBusConnection__fullyQualifiedNamespace."""
    from azure.servicebus import ServiceBusClient

    if settings.service_bus_connection_string is not None:
        return ServiceBusClient.from_connection_string(settings.service_bus_connection_string.get_secret_value())
    from azure.identity import DefaultAzureCredential

    return ServiceBusClient(settings.service_bus_namespace, DefaultAzureCredential())


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
        self._queued: dict[str, deque[SendBatch]] = {}
        self._registry_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceBusTransport:
        """The transport over service_bus_client(settings): the connection string, else managed identity."""
        return cls(service_bus_client(settings))

    def describe_error(self, error: BaseException) -> str:
        """One line for a failed send: the error's class, the namespace and what to check. Never the SDK's text,
        which may quote the connection's details."""
        # The class name only: SDK error texts are long and may quote the connection's details.
        namespace = getattr(self._client, "fully_qualified_namespace", None)
        where = f" at {namespace}" if isinstance(namespace, str) else ""
        return (
            f"{error.__class__.__name__}{where}; check the ServiceBusConnection settings and the "
            "Azure Service Bus Data Sender role of the identity"
        )

    def send(self, events: Sequence[CloudEvent]) -> None:
        """Send each event to the queue named after its type (SERVICE_BUS_QUEUES; another type is a KeyError), in
        as few message batches as fit, and return once sent. Thread-safe: concurrent sends to a queue share one
        network send, and a failure of that send is raised in each of them. Queues already sent to stay sent
        when a later queue fails."""
        by_queue: dict[str, list[CloudEvent]] = {}
        for event in events:
            by_queue.setdefault(SERVICE_BUS_QUEUES[event.type], []).append(event)
        for queue, queue_events in by_queue.items():
            sender, lock, queued = self._sender(queue)
            batch = SendBatch(queue_events)
            queued.append(batch)
            with lock:
                if not batch.done:
                    self._send_queued(sender, queued)
            if batch.error is not None:
                raise batch.error

    @staticmethod
    def _send_queued(sender: Any, queued: deque[SendBatch]) -> None:
        """Send every batch queued for this sender; a failure fails each of them (their senders raise)."""
        from azure.servicebus.exceptions import MessageSizeExceededError

        taken: list[SendBatch] = []
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

    def _sender(self, queue: str) -> tuple[Any, threading.Lock, deque[SendBatch]]:
        with self._registry_lock:
            if queue not in self._senders:
                self._senders[queue] = self._client.get_queue_sender(queue)
                self._locks[queue] = threading.Lock()
                self._queued[queue] = deque()
            return self._senders[queue], self._locks[queue], self._queued[queue]

    def close(self) -> None:
        """Close every sender and the client, for good (shared.runtime.reset)."""
        with self._registry_lock:
            for sender in self._senders.values():
                sender.close()
            self._senders.clear()
            self._client.close()


def service_bus_message(event: CloudEvent) -> Any:
    """The Service Bus message an event is sent as (docs/events.md): the CloudEvent as the body,
    its MessageId (service_bus_message_id), its type as application property, and for a refresh request the check
    scheduled, its scheduled enqueue time. No session: the refresh queue is not session-enabled (a session slot of
    the Functions processor would hold each one-message session for sessionIdleTimeout; docs/scale.md), and the
    claim, not the broker, keeps two invocations from calling for one request at once."""
    from azure.servicebus import ServiceBusMessage

    return ServiceBusMessage(
        event.to_json(),
        message_id=service_bus_message_id(event),
        content_type=CONTENT_TYPE,
        application_properties={"type": event.type},
        scheduled_enqueue_time_utc=scheduled_time(event),
    )


def service_bus_message_id(event: CloudEvent) -> str:
    """The MessageId an event is sent with: its id, and for a refresh request that a later check asked for again
    after it had ended retryable, its round too (`<id>.round-<n>`). The refresh queue's duplicate detection drops a
    repeated MessageId for its whole history window, whatever became of the first message: a copy of the same round
    (an overlapping check, a re-sent batch) is absorbed, a later round is delivered (docs/failure-handling.md)."""
    attempt_round = event.data.get("attemptRound") if event.type == REFRESH_REQUESTED else None
    return f"{event.id}.round-{attempt_round}" if attempt_round else event.id


def scheduled_time(event: CloudEvent) -> datetime | None:
    """When Service Bus is to deliver a refresh request the check scheduled (its `notBefore`; a scheduled
    message). None, delivered at once, for every other event, and for a time that has passed."""
    if event.type != REFRESH_REQUESTED or not event.data.get("notBefore"):
        return None
    at = parse_time(str(event.data["notBefore"]))
    return at if at > utc_now() else None
