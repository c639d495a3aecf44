"""The one place where a failure of a local command becomes what the operator reads: one `error: …` line naming
what failed (host:port, the setting) and the fix, and an exit code; never a traceback (`--debug` shows one) and
never a secret (shared/secrets.py scrubs every text that came from outside).

Exit codes: 0 done; 1 the command could not or would not do it; 2 a usage error or a bad or missing setting.
"""

from __future__ import annotations

import binascii
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from localdev.errors import OperatorError, ServiceError
from localdev.local_services import ServiceStartError
from shared.errors import PublishError, SettingsError
from shared.secrets import Scrubber
from shared.settings import Settings

DEBUG_VARIABLE = "LOCALDEV_DEBUG"
START_SERVICES = "start it (`make services-up`, which also rewrites the ports in local.settings.json)"
# RabbitMQ's answer to a queue declared again with other arguments (AMQP 406 PRECONDITION_FAILED).
_INEQUIVALENT_ARG = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '(?P<queue>[^']+)'.*?"
    r"received (?:the value )?'?(?P<received>[^' \")]*).*?current is (?:the value )?'?(?P<current>[^' \")]*)"
)


def address(url: str | None, default_port: int) -> str:
    """host:port of a service URL, never its user, password or path."""
    try:
        parts = urlsplit(url or "")
        return f"{parts.hostname or '?'}:{parts.port or default_port}"
    except ValueError:  # a malformed port
        return "an unparsable address"


def broker_address(settings: Settings) -> str:
    return address(settings.rabbitmq_url.get_secret_value() if settings.rabbitmq_url else None, 5672)


def cosmos_address(settings: Settings) -> str:
    return address(settings.cosmos_endpoint, 443)


def explain(error: BaseException, settings: Settings | None) -> OperatorError | None:
    """The operator's error for a known failure (this error or one it was raised from); None for an unknown one."""
    for cause in _chain(error):
        if isinstance(cause, OperatorError):
            return cause
        if isinstance(cause, PublishError):  # says which transport, where, and what to check
            return OperatorError(_scrub(settings, cause))
        if isinstance(cause, ServiceStartError):  # its first line says which; the rest is the service's log
            return OperatorError(f"{_scrub(settings, cause)} ({DEBUG_VARIABLE}=1 shows the service's log)")
        if settings is not None and (
            known := _service_bus(cause, settings) or _cosmos(cause, settings) or _rabbitmq(cause, settings)
        ):
            return known
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        # What it was raised from, or while handling; not a context its raiser dropped (`raise … from None`).
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)


def _scrub(settings: Settings | None, value: object, limit: int = 300) -> str:
    text = str(value).strip().splitlines()[0] if str(value).strip() else value.__class__.__name__
    return Scrubber(settings)(text, limit)


def _cosmos(error: BaseException, settings: Settings) -> ServiceError | None:
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError
    from azure.cosmos.exceptions import CosmosHttpResponseError

    where = f"{cosmos_address(settings)}, COSMOS_ENDPOINT"
    if isinstance(error, binascii.Error):  # the SDK signs every request with the key, decoded from base64
        return ServiceError(
            "COSMOS_KEY is not a Cosmos account key (not base64)",
            f"{cosmos_address(settings)}, COSMOS_KEY",
            "set COSMOS_KEY to the account's primary key (`make services-up` writes the local server's)",
        )
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        reason = "connection refused: nothing listens there" if "refused" in str(error).lower() else _reason(error)
        fix = START_SERVICES + " or fix COSMOS_ENDPOINT"
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            fix = "set COSMOS_EMULATOR=true for the local server's self-signed certificate"
        return ServiceError(f"Cosmos DB cannot be reached: {_scrub(settings, reason)}", where, fix)
    if isinstance(error, ClientAuthenticationError) or getattr(error, "status_code", None) in (401, 403):
        return ServiceError(
            "Cosmos DB refused COSMOS_KEY",
            f"{cosmos_address(settings)}, COSMOS_KEY",
            "set COSMOS_KEY to the account's key",
        )
    if isinstance(error, CosmosHttpResponseError) and error.status_code == 404:
        return ServiceError(
            f"Cosmos DB has no database '{settings.cosmos_database}' or container "
            f"'{settings.cosmos_connections_container}'",
            f"{cosmos_address(settings)}, COSMOS_DATABASE, COSMOS_CONNECTIONS_CONTAINER",
            "fix the names or create them (`make services-up` seeds the local one)",
        )
    if isinstance(error, CosmosHttpResponseError):
        return ServiceError(
            f"Cosmos DB answered HTTP {error.status_code}", where, "see `python -m localdev --debug …` for the answer"
        )
    return None


def _rabbitmq(error: BaseException, settings: Settings) -> ServiceError | None:
    import pika

    where = f"{broker_address(settings)}, RABBITMQ_URL"
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and (
        mismatch := _INEQUIVALENT_ARG.search(error.reply_text or "")
    ):
        queue, arg, current = mismatch["queue"], mismatch["arg"], mismatch["current"]
        use_it = f"pass --max-deliveries {current} (the queue's) or " if arg == "x-delivery-limit" else ""
        return ServiceError(
            f"RabbitMQ queue '{queue}' was declared with {arg} {current}, this run asks for {mismatch['received']}",
            where,
            f"{use_it}use another --queue-prefix; a fresh broker (`make services-down && make services-up`) "
            "forgets the old queues",
        )
    refused = (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
        pika.exceptions.ProbableAccessDeniedError,
    )
    if isinstance(error, refused):
        return ServiceError(
            "RabbitMQ refused the user or virtual host of RABBITMQ_URL", where, "fix the user, password or vhost"
        )
    if isinstance(error, pika.exceptions.AMQPError):
        reason = _scrub(settings, _reason(error))
        return ServiceError(f"RabbitMQ cannot be used: {reason}", where, START_SERVICES + " or fix RABBITMQ_URL")
    return None


def service_bus_address(settings: Settings) -> str:
    """The namespace's host (from the identity form, or the connection string's Endpoint), never its key."""
    if settings.service_bus_namespace:
        return f"{settings.service_bus_namespace}, ServiceBusConnection__fullyQualifiedNamespace"
    connection = settings.service_bus_connection_string
    endpoint = re.search(r"Endpoint=([^;]+)", connection.get_secret_value()) if connection else None
    return f"{address(endpoint[1] if endpoint else None, 5671)}, ServiceBusConnection"


def _service_bus(error: BaseException, settings: Settings) -> ServiceError | None:
    from azure.servicebus import exceptions as service_bus

    where = service_bus_address(settings)
    if isinstance(error, service_bus.ServiceBusAuthenticationError | service_bus.ServiceBusAuthorizationError):
        return ServiceError(
            "Azure Service Bus refused the credentials",
            where,
            "check the connection string's key, or that your identity has 'Azure Service Bus Data Receiver' (and "
            "Data Sender, to replay) on the namespace (docs/deploy.md)",
        )
    if isinstance(error, service_bus.MessagingEntityNotFoundError):
        return ServiceError(
            f"Azure Service Bus has no such queue: {_scrub(settings, error)}",
            where,
            "deploy the queues (`make deploy`, docs/deploy.md) or fix the queue name",
        )
    if isinstance(error, service_bus.ServiceBusConnectionError | service_bus.ServiceBusCommunicationError):
        return ServiceError(
            f"Azure Service Bus cannot be reached: {_scrub(settings, _reason(error))}",
            where,
            "check the namespace's name and this machine's network access to it (port 5671, or 443 over WebSockets)",
        )
    return None


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


def report_failures(command: Callable[[], int], settings: Callable[[], Settings | None], *, debug: bool) -> int:
    """Run `command`; a failure becomes one `error: …` line on stderr and its exit code (the module docstring).
    With `debug` (or LOCALDEV_DEBUG=1, for the make targets), the traceback (scrubbed) comes first."""
    debug = debug or os.environ.get(DEBUG_VARIABLE) == "1"
    try:
        return command()
    except SettingsError as error:
        _print_debug(error, settings(), debug)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the one place every failure of a command is reported
        known = explain(error, settings())
        _print_debug(error, settings(), debug)
        if known is not None:
            print(f"error: {known}", file=sys.stderr)
        else:
            print(
                f"error: unexpected {_scrub(settings(), _reason(error))}; run again with --debug "
                f"({DEBUG_VARIABLE}=1 for a make target) for the traceback",
                file=sys.stderr,
            )
        return 1


def _print_debug(error: BaseException, settings: Settings | None, debug: bool) -> None:
    if debug:
        print(Scrubber(settings).scrub("".join(traceback.format_exception(error))), file=sys.stderr, end="")
