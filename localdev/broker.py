"""The local tooling's RabbitMQ connections: their parameters, and which errors mean "the broker went
away" (reconnect) or "it refused us" (stop with a clear message)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pika

from shared.secrets import Scrubber
from shared.settings import Settings

logger = logging.getLogger(__name__)

RECONNECT_INITIAL_S = 0.25  # back-off after a lost connection, doubling ...
RECONNECT_MAX_S = 5.0  # ... up to this

# The connection to the broker is gone (dropped, broker restarting): reconnect, redeclare, go on.
BROKER_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,  # includes StreamLostError, ConnectionClosedByBroker
    pika.exceptions.ChannelWrongStateError,  # an operation on a channel of a connection that is gone
    pika.exceptions.ConsumerCancelled,  # the broker cancelled our consumer (e.g. a queue moved)
)
# Retrying cannot fix these: stop with a clear message.
FATAL_CONNECTION_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
    pika.exceptions.IncompatibleProtocolError,
)


def describe_connection_error(error: BaseException, scrub: Scrubber | None = None) -> str:
    text = (scrub.scrub(error) if scrub else str(error)).strip()
    return f"{error.__class__.__name__}: {text}"[:300] if text else error.__class__.__name__


def longest_invocation_s(settings: Settings) -> float:
    """An upper bound of one refresh invocation: its retry budget, the last call's timeouts, the wait
    for an earlier call that may be in flight, and a redelivery's wait to take a claim over."""
    from shared.token_refresh import TAKE_OVER_MAX_WAIT_MS

    return (
        settings.integration_manager_retry_budget_ms
        + settings.integration_manager_connect_timeout_ms
        + settings.integration_manager_timeout_ms
        + settings.integration_manager_in_flight_ms
        + TAKE_OVER_MAX_WAIT_MS
    ) / 1000


def connection_parameters(settings: Settings) -> pika.URLParameters:
    """The local host's broker connection. A consumer runs each invocation on its connection's thread,
    so no heartbeat is sent while one runs: a heartbeat timeout shorter than an invocation would make
    RabbitMQ close the connection and hand the message to another consumer mid-refresh. The heartbeat
    is therefore at least the longest invocation (whatever the URL or the broker proposes)."""
    parameters = pika.URLParameters(settings.rabbitmq_url.get_secret_value())
    needed = math.ceil(longest_invocation_s(settings))
    asked = parameters.heartbeat
    if isinstance(asked, int) and 0 < asked < needed:
        logger.warning("RabbitMQ heartbeat %d s is shorter than the longest invocation; using %d s", asked, needed)
    parameters.heartbeat = lambda connection, proposed: max(proposed or 0, asked or 0, needed)
    return parameters


def persistent_copy(properties: Any, headers: dict[str, Any] | None, **changed: Any) -> pika.BasicProperties:
    """A message's properties for publishing it again: persistent, with `headers` in place of its own and the
    `changed` fields; user_id is dropped (RabbitMQ checks it against the publishing user)."""
    fields = {
        "content_type": properties.content_type,
        "content_encoding": properties.content_encoding,
        "headers": headers,
        "delivery_mode": pika.DeliveryMode.Persistent,
        "priority": properties.priority,
        "correlation_id": properties.correlation_id,
        "reply_to": properties.reply_to,
        "message_id": properties.message_id,
        "timestamp": properties.timestamp,
        "type": properties.type,
        "app_id": properties.app_id,
    }
    return pika.BasicProperties(**(fields | changed))
