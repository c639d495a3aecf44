"""On integration.token.refresh-requested: refresh through integration-manager, publish the outcome."""

import azure.functions as func

from shared import telemetry
from shared.token_refresh import handle_refresh_requested_message


def main(message: func.ServiceBusMessage, context: func.Context) -> None:
    """Functions entry point for a message on the `integration.token.refresh-requested` queue: runs
    shared.token_refresh.handle_refresh_requested_message with the invocation's log fields. An exception fails the
    invocation and Service Bus redelivers the message up to its max delivery count; the request's claim makes a
    redelivery continue the request, never call twice at once."""
    with telemetry.invocation(context, "sync_refresh_handler"):
        handle_refresh_requested_message(
            message.get_body(), delivery_count=message.delivery_count, message_id=message.message_id
        )
