"""EventPublisher: one `publish` for every event, over every configured transport.

Delivery is at-least-once: when a transport fails, `publish` raises, the triggering message is
retried, and events that already reached the other transport are sent again with the same ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from shared.errors import PublishError, SettingsError
from shared.events import CloudEvent
from shared.settings import Settings

logger = logging.getLogger(__name__)


class EventTransport(Protocol):
    """What EventPublisher sends through (RabbitMqTransport, ServiceBusTransport). `name` appears in error texts;
    an optional `describe_error(error) -> str` gives the one-line reason for a failed send, naming no secret."""

    name: str

    def send(self, events: Sequence[CloudEvent]) -> None:
        """Deliver every event, or raise. Called from several invocation threads at once."""

    def close(self) -> None:
        """Release the transport's connections."""


@runtime_checkable
class RetryScheduler(Protocol):
    """Delivers a refresh request again later, on the queue that triggers the refresh function."""

    def schedule_retry(self, event: CloudEvent, retry: int, at: datetime, attempt_round: int = 0) -> None:
        """Have `event` delivered again at `at` (aware datetime) as retry `retry` of round `attempt_round`. The
        copy's message id must differ from the event id and from earlier rounds' retries, or duplicate detection
        would drop it."""


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
        return next((t for t in self.transports if isinstance(t, RetryScheduler)), None)

    def publish(self, events: Iterable[CloudEvent]) -> int:
        """Send the events to every transport, each getting the whole batch, and return how many events that was (0
        for none: nothing is sent). Thread-safe: invocation threads share one publisher.

        A failing transport does not stop the others. Once all were tried, PublishError names each failed
        transport with what to check (`errors` keeps their exceptions). Delivery is at-least-once: events that
        reached a transport stay sent, and the caller's retry sends them again under the same ids."""
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
        """Close every transport (shared.runtime.reset); the publisher is not used afterwards."""
        for transport in self.transports:
            transport.close()


# RabbitMQ ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class SendBatch:
    """The events of one `send` call, followed until the broker confirmed every one of them."""

    events: Sequence[CloudEvent]
    unconfirmed: int = 0
    nacked: int = 0
    returned: list[str] = field(default_factory=list)  # routing keys of events returned unroutable
    attempts: int = 0
    done: bool = False
    error: BaseException | None = None


def publisher_from_settings(settings: Settings, *, rabbitmq_mandatory: bool = False) -> EventPublisher:
    """The app's publisher. `rabbitmq_mandatory` (operator commands): an event no RabbitMQ queue is
    bound for fails the publish instead of being dropped by the broker."""
    from shared.messaging.rabbitmq import RabbitMqTransport
    from shared.messaging.service_bus import ServiceBusTransport

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
