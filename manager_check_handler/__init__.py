"""On integration.token.check-expiring: find expiring connections, request one refresh each."""

import azure.functions as func

from shared import telemetry
from shared.expiring_check import handle_check_expiring_message


def main(message: func.ServiceBusMessage, context: func.Context) -> None:
    with telemetry.invocation(context, "manager_check_handler"):
        handle_check_expiring_message(
            message.get_body(), delivery_count=message.delivery_count, message_id=message.message_id
        )
