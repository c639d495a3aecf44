"""Small helpers shared by the test modules."""

from azure.functions.servicebus import ServiceBusMessage

from shared.events import CloudEvent
from shared.events import format_time as iso  # noqa: F401 - re-exported: ISO-8601 UTC with a Z, as the platform writes


def trigger(
    event_or_body: CloudEvent | bytes, delivery_count: int = 1, message_id: str | None = None
) -> ServiceBusMessage:
    """The Service Bus trigger object the Functions host would pass for this event (or raw body)."""
    is_event = isinstance(event_or_body, CloudEvent)
    return ServiceBusMessage(
        body=event_or_body.to_json() if is_event else event_or_body,
        message_id=message_id or (event_or_body.id if is_event else "m-1"),
        delivery_count=delivery_count,
        application_properties={},
        user_properties={},
    )
