"""One `publish` for every event: Azure Service Bus and the bridge to the platform's RabbitMQ.

Transports are created once per worker process (see `shared.runtime`) and are safe to use from
several invocation threads at once: pika connections and Service Bus senders are not thread-safe,
so only one thread at a time uses a connection or sender -- and that thread also sends what other
threads queued meanwhile, so concurrent invocations share round trips instead of waiting in line.

Delivery is at-least-once: when a transport fails, `publish` raises, the triggering message is
retried, and events that already reached the other transport are sent again with the same ids.

The package: `publisher` (EventPublisher, the transport protocols, `publisher_from_settings`),
`rabbitmq` (RabbitMqTransport) and `service_bus` (ServiceBusTransport, the queue names, the client).
"""

from shared.messaging.publisher import EventPublisher, EventTransport, RetryScheduler, publisher_from_settings
from shared.messaging.rabbitmq import RabbitMqTransport
from shared.messaging.service_bus import (
    SERVICE_BUS_QUEUES,
    ServiceBusTransport,
    service_bus_client,
    service_bus_message,
    service_bus_message_id,
)

__all__ = [
    "SERVICE_BUS_QUEUES",
    "EventPublisher",
    "EventTransport",
    "RabbitMqTransport",
    "RetryScheduler",
    "ServiceBusTransport",
    "publisher_from_settings",
    "service_bus_client",
    "service_bus_message",
    "service_bus_message_id",
]
