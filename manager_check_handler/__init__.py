"""On integration.token.check-expiring: find expiring connections, request one refresh each."""

import azure.functions as func

from shared import telemetry
from shared.expiring_check import handle_check_expiring_message


def main(message: func.ServiceBusMessage, context: func.Context) -> None:
    """Functions entry point for a message on the `integration.token.check-expiring` queue: runs
    shared.expiring_check.handle_check_expiring_message with the invocation's log fields. An exception fails the
    invocation, so Service Bus redelivers the message up to its max delivery count, then dead-letters it; a
    rerun requests the same connections under the same ids."""
    with telemetry.invocation(context, "manager_check_handler"):
        handle_check_expiring_message(
            message.get_body(), delivery_count=message.delivery_count, message_id=message.message_id
        )
