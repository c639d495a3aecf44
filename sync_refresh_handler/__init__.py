"""On integration.token.refresh-requested: refresh through integration-manager, publish the outcome."""

import azure.functions as func

from shared import telemetry
from shared.token_refresh import handle_refresh_requested_message


def main(message: func.ServiceBusMessage, context: func.Context) -> None:
    with telemetry.invocation(context, "sync_refresh_handler"):
        handle_refresh_requested_message(
            message.get_body(), delivery_count=message.delivery_count, message_id=message.message_id
        )
