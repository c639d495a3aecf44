"""Operator commands of `python -m localdev`: publish a check now (`trigger`), request one
connection's refresh now (`refresh`), and inspect or replay dead-lettered messages (`dead-letters`)
of the local host's RabbitMQ queues or of the Service Bus queues.

Every command prints what it did. `OperatorError` means "could not or would not do it" (exit 1),
`UsageError` means "the command line must change" (exit 2). Nothing printed carries a secret:
settings' secrets are never formatted, texts that come from outside (exception messages, dead-letter
descriptions, ids read from message bodies) are scrubbed of them, made printable and shortened, and
message bodies are never printed — only the ids, type and reason they carry.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from localdev.errors import OperatorError, UsageError
from localdev.failures import explain
from shared.claim import Claim
from shared.connection_store import ExpiringConnection
from shared.connection_store import connection_from_row as shared_connection_from_row
from shared.errors import (
    InvalidConnectionDocumentError,
    PublishError,
    SettingsError,
    UnroutableEventsError,
)
from shared.events import CHECK_EXPIRING, MAX_EVENT_BYTES, REFRESH_REQUESTED, CloudEvent
from shared.messaging import SERVICE_BUS_QUEUES, EventPublisher, service_bus_client
from shared.secrets import Scrubber
from shared.settings import Settings
from shared.times import format_time, utc_now

logger = logging.getLogger(__name__)

# The two queues that trigger functions, by the short names the CLI accepts (`--queue`).
QUEUE_EVENT_TYPES = {"check-expiring": CHECK_EXPIRING, "refresh-requested": REFRESH_REQUESTED}
TRANSPORTS = ("rabbitmq", "service-bus")
DEFAULT_QUEUE_PREFIX = "integration-token-refresh."  # = localdev.local_host.QUEUE_PREFIX
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
SERVICE_BUS_RECEIVE_WAIT_S = 5.0
SERVICE_BUS_PAGE = 100

# Headers the local host (and RabbitMQ's own dead-lettering) add; a replayed message goes back without them.
DEAD_LETTER_HEADERS = (
    "x-dead-letter-reason",
    "x-dead-letter-error-description",
    "x-source-queue",
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
# Service Bus keeps the dead-letter reason and description as application properties.
SERVICE_BUS_DEAD_LETTER_PROPERTIES = ("DeadLetterReason", "DeadLetterErrorDescription")


# Output hygiene ----------------------------------------------------------------------------------


def describe_error(error: BaseException, scrub: Scrubber) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{error.__class__.__name__}: {scrub(text, 300)}" if text else error.__class__.__name__


def destinations(settings: Settings, event_type: str) -> str:
    """Where the app's publisher sends an event of this type (for the operator's output)."""
    where = []
    if settings.service_bus_configured:
        where.append(f"Service Bus queue '{SERVICE_BUS_QUEUES[event_type]}'")
    if settings.rabbitmq_configured:
        where.append(f"RabbitMQ exchange '{settings.rabbitmq_exchange}' (routing key {event_type})")
    return "; ".join(where) or "no transport"


def operator_publisher(settings: Settings) -> EventPublisher:
    """The publisher of `trigger` and `refresh`. Without Service Bus, RabbitMQ drives the functions
    (the local host): an event no queue is bound for would reach no function, so it must fail
    (mandatory). With Service Bus, RabbitMQ is only the bridge to the platform, which may not listen."""
    from shared.messaging import publisher_from_settings

    return publisher_from_settings(settings, rabbitmq_mandatory=not settings.service_bus_configured)


def _publish(publisher: EventPublisher, event: CloudEvent, scrub: Scrubber) -> None:
    try:
        publisher.publish([event])
    except PublishError as error:
        message = f"could not publish {event.type} (eventId {event.id}): {scrub(error.details, 600)}"
        if any(isinstance(cause, UnroutableEventsError) for cause in error.errors.values()):
            message += (
                ". Nothing would receive it: start the local host first (`python -m localdev run`), which "
                "declares its queues and binds them to the exchange (same RABBITMQ_URL and RABBITMQ_EXCHANGE)"
            )
        raise OperatorError(message) from None


# trigger -------------------------------------------------------------------------------------------


def trigger_check(settings: Settings, publisher: EventPublisher, *, force: bool, now: datetime | None = None) -> int:
    """Publish one check-expiring event now, exactly as the timer builds it. Ignores the cadence."""
    from shared.check_timer import build_check_expiring_event

    scrub = Scrubber(settings)
    if not settings.enabled and not force:
        raise OperatorError(
            "Token refresh is disabled (TOKEN_REFRESH_ENABLED=false): not publishing a check-expiring event. "
            "Pass --force to publish one anyway."
        )
    event = build_check_expiring_event(settings, now or utc_now())
    _publish(publisher, event, scrub)
    print(
        f"Published {CHECK_EXPIRING} eventId={event.id} thresholdTime={event.data['thresholdTime']} "
        f"(timestamp={event.data['timestamp']}, threshold {settings.expiration_threshold_ms} ms)"
    )
    print(f"  to: {destinations(settings, CHECK_EXPIRING)}")
    if not settings.enabled:
        print("  note: TOKEN_REFRESH_ENABLED=false; published anyway (--force). The timer stays switched off.")
    print("  manager_check_handler picks it up and requests a refresh of every connection due by thresholdTime.")
    return 0


# refresh -------------------------------------------------------------------------------------------

_CONNECTION_QUERY = (
    "SELECT c.id, c.tenantId, c.integrationId, c.status, c.oauth.expiresAt AS expiresAt, "
    "IS_DEFINED(c.oauth) AS hasOAuth, c._ts FROM c WHERE c.id = @id"
)


def find_connection(container: Any, integration_id: str, connection_id: str, tenant_id: str | None) -> dict[str, Any]:
    """The connection document's projection (no token values): by id, in `tenant_id` when given,
    whose integrationId matches. OperatorError when there is none, UsageError when several tenants have one."""
    query, parameters = _CONNECTION_QUERY, [{"name": "@id", "value": connection_id}]
    options: dict[str, Any] = {"enable_cross_partition_query": True}
    if tenant_id is not None:
        query += " AND c.tenantId = @tenantId"
        parameters.append({"name": "@tenantId", "value": tenant_id})
        options = {"partition_key": tenant_id}
    rows = list(container.query_items(query=query, parameters=parameters, **options))
    where = f" in tenant {tenant_id!r}" if tenant_id is not None else ""
    if not rows:
        raise OperatorError(f"No connection with id {connection_id!r}{where} in the connections container.")
    # A numeric integrationId names the same integration as its text (as in the check).
    matching = [row for row in rows if _as_text(row.get("integrationId")) == integration_id]
    if not matching:
        others = ", ".join(
            sorted({f"{_as_text(row.get('integrationId'))!r} (tenant {row.get('tenantId')!r})" for row in rows})[:10]
        )
        raise OperatorError(
            f"Connection {connection_id!r}{where} does not belong to integration {integration_id!r}; "
            f"it belongs to {others}."
        )
    if len(matching) > 1:
        tenants = ", ".join(sorted(repr(row.get("tenantId")) for row in matching)[:10])
        raise UsageError(
            f"connection {connection_id!r} of integration {integration_id!r} exists in {len(matching)} tenants "
            f"({tenants}); pass --tenant TENANT_ID"
        )
    return matching[0]


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def connection_from_row(row: dict[str, Any]) -> ExpiringConnection:
    try:
        return shared_connection_from_row(row)  # a numeric integrationId becomes text there, as in the check
    except InvalidConnectionDocumentError as error:
        raise OperatorError(f"Connection {row.get('id')!r} cannot be refreshed: {error}; fix the document.") from None


def request_refresh(
    settings: Settings,
    connections_container: Callable[[], Any],
    publisher: Callable[[], EventPublisher],
    *,
    integration_id: str,
    connection_id: str,
    tenant_id: str | None,
    force: bool,
    state_store: Callable[[], Any] | None = None,
) -> int:
    """Publish the refresh-requested event the check would publish for this connection (same id).
    The clients are passed as factories: building them may already talk to Azure."""
    from shared.expiring_check import refresh_requested_event, request_id_of
    from shared.messaging import service_bus_message_id

    scrub = Scrubber(settings)
    # The Cosmos SDK's errors (unreachable, a key it cannot use) are explained by the CLI (localdev/failures.py).
    row = find_connection(connections_container(), integration_id, connection_id, tenant_id)
    if row.get("hasOAuth") is False:
        raise OperatorError(f"Connection {connection_id!r} has no oauth object: it is not an OAuth connection.")
    connection = connection_from_row(row)
    notes = []
    status = (connection.status or "").strip().lower()
    if status in settings.skip_statuses:
        if not force:
            raise OperatorError(
                f"Connection {connection_id!r} is {connection.status!r} (in TOKEN_REFRESH_SKIP_STATUSES): not "
                "requesting a refresh; sync_refresh_handler would skip it anyway. Pass --force to publish the "
                "request regardless."
            )
        notes.append(
            f"published anyway (--force); sync_refresh_handler re-reads the connection and skips it while its "
            f"status is {connection.status!r}."
        )
    requested_at = utc_now()
    claim, claim_notes = _earlier_request(state_store, request_id_of(connection), requested_at, scrub)
    event = refresh_requested_event(connection, requested_at, attempt_round=_attempt_round(claim, requested_at))
    notes.extend(claim_notes)
    _publish(publisher(), event, scrub)
    data = event.data
    print(
        f"Requested a refresh of connection {connection.connection_id!r} "
        f"(integrationId={connection.integration_id!r}, tenantId={connection.tenant_id!r}, "
        f"status={connection.status or '-'})"
    )
    print(
        f"  published {REFRESH_REQUESTED} eventId={event.id} expiresAt={data.get('expiresAt', '-')} "
        f"requestedAt={data['requestedAt']}"
    )
    print(f"  to: {destinations(settings, REFRESH_REQUESTED)}")
    if settings.service_bus_configured:
        notes.append(
            f"Service Bus duplicate detection drops this request if a message with its MessageId "
            f"{service_bus_message_id(event)} (same connection, expiresAt and attempt round) reached the queue "
            "within its DuplicateDetectionHistoryTimeWindow: that request is still pending or already handled."
        )
    if not settings.enabled:
        notes.append(
            "TOKEN_REFRESH_ENABLED=false stops only the timer; sync_refresh_handler still handles this request."
        )
    for note in notes:
        print(f"  note: {note}")
    return 0


def _attempt_round(claim: Claim | None, requested_at: datetime) -> int:
    """The attempt round of a request published now for this claim (shared.claim.next_attempt_round)."""
    from shared.claim import next_attempt_round

    return next_attempt_round(claim.document(), int(requested_at.timestamp() * 1000)) if claim else 0


def _earlier_request(
    state_store: Callable[[], Any] | None, request_id: str, requested_at: datetime, scrub: Scrubber
) -> tuple[Claim | None, list[str]]:
    """The claim of a request id seen before (deterministic ids), and what the handler will do with it."""
    if state_store is None:
        return None, []
    from shared.claim import TERMINAL_STATES, superseded

    try:
        claim = state_store().claims.get(request_id)
    except Exception as error:  # informational only: the request is published either way
        logger.debug("reading the claim failed", exc_info=True)
        return None, [f"could not look up earlier attempts of this request ({describe_error(error, scrub)})."]
    if claim is None:
        return None, []
    requested_at_ms = int(requested_at.timestamp() * 1000)
    state = claim.state
    if state in TERMINAL_STATES and not superseded(claim, requested_at_ms):
        return claim, [
            f"this request id already ended ({state}); sync_refresh_handler will not call integration-manager "
            "for it again (it logs 'this request was already handled'). A new request id needs a changed "
            "oauth.expiresAt (e.g. after the user reconnects)."
        ]
    if claim.held_at(requested_at_ms):
        return claim, [
            "another invocation is refreshing this connection right now; this request is skipped while it does."
        ]
    return claim, []


# dead letters --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """What an operator needs to know about one dead-lettered message (never its body)."""

    message_id: str | None
    event_type: str | None
    connection_id: str | None
    delivery_count: int | None
    reason: str | None
    description: str | None
    enqueued_at: datetime | None
    sequence_number: int | None = None


def ids_from_body(body: bytes) -> tuple[str | None, str | None]:
    """The event type and connectionId a body claims to have (it may be anything: a poison message)."""
    if len(body) > MAX_EVENT_BYTES:
        return None, None
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    event_type = document.get("type") if isinstance(document.get("type"), str) else None
    data = document.get("data")
    connection_id = data.get("connectionId") if isinstance(data, dict) else None
    return event_type, connection_id if isinstance(connection_id, str | int) else None


def format_dead_letter(number: int, letter: DeadLetter, scrub: Scrubber) -> list[str]:
    def show(value: Any, limit: int = 120) -> str:
        return "-" if value is None or value == "" else scrub(value, limit)

    enqueued = format_time(letter.enqueued_at) if letter.enqueued_at else "-"
    sequence = f"  sequenceNumber={letter.sequence_number}" if letter.sequence_number is not None else ""
    reason = show(letter.reason, 100)
    if letter.description:
        reason += f" — {scrub(letter.description, 400)}"
    return [
        f"  {number}. messageId={show(letter.message_id)}  type={show(letter.event_type)}  "
        f"connectionId={show(letter.connection_id)}  deliveries={show(letter.delivery_count)}  "
        f"enqueued={enqueued}{sequence}",
        f"     reason: {reason}",
    ]


def _header_text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def rabbitmq_dead_letter(properties: Any, body: bytes) -> DeadLetter:
    headers = properties.headers or {}
    body_type, connection_id = ids_from_body(body)
    reason = _header_text(headers.get("x-dead-letter-reason"))
    description = _header_text(headers.get("x-dead-letter-error-description"))
    enqueued = datetime.fromtimestamp(properties.timestamp, tz=UTC) if properties.timestamp else None
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        # Dead-lettered by RabbitMQ itself (the quorum queue's delivery limit, a rejection, a TTL).
        death = deaths[0]
        reason = reason or f"RabbitMQ: {_header_text(death.get('reason'))} on {_header_text(death.get('queue'))}"
        if enqueued is None and isinstance(death.get("time"), datetime):
            enqueued = death["time"].replace(tzinfo=death["time"].tzinfo or UTC)
    count = headers.get("x-delivery-count")
    return DeadLetter(
        message_id=properties.message_id,
        event_type=properties.type or body_type,
        connection_id=None if connection_id is None else str(connection_id),
        delivery_count=count if isinstance(count, int) else None,
        reason=reason,
        description=description,
        enqueued_at=enqueued,
    )


def replay_properties(properties: Any) -> Any:
    """The original message properties minus the dead-letter headers (and user_id, which RabbitMQ
    checks against the publishing user)."""
    from localdev.broker import persistent_copy

    headers = {k: v for k, v in (properties.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
    return persistent_copy(
        properties, headers or None, expiration=properties.expiration, cluster_id=properties.cluster_id
    )


class RabbitMqDeadLetters:
    """The local host's dead-letter queues: `<prefix><queue>.dead-letter`, one per trigger queue."""

    transport = "RabbitMQ"

    def __init__(self, url: str, queue_prefix: str, scrub: Scrubber):
        self._url = url
        self._prefix = queue_prefix
        self._scrub = scrub
        self._connection: Any = None

    def source_queue(self, short: str) -> str:
        return self._prefix + short  # as localdev.local_host.load_function_app names them

    def dead_letter_queue(self, short: str) -> str:
        return self.source_queue(short) + ".dead-letter"

    def __enter__(self) -> RabbitMqDeadLetters:
        import pika

        # pika's own records are at DEBUG (shared.third_party_logs, set up by the CLI): a failure is
        # reported once, by dead_letters() (host:port, RABBITMQ_URL). Not by setting pika's level and back: that
        # races with other threads.
        self._connection = pika.BlockingConnection(pika.URLParameters(self._url))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(Exception):
                self._connection.close()

    def _message_count(self, queue: str) -> int:
        import pika

        channel = self._connection.channel()
        try:
            count = channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                raise OperatorError(
                    f"RabbitMQ queue '{queue}' does not exist: `python -m localdev run` declares it. "
                    "Check --queue-prefix (it must match the one `run` used) and RABBITMQ_URL."
                ) from None
            raise
        channel.close()
        return count

    def peek(self, short: str, limit: int) -> tuple[str, int, list[DeadLetter]]:
        """Up to `limit` dead letters, oldest first, without consuming: they are fetched unacknowledged
        and all given back at once (basic.nack requeue), which puts them back in their original order."""
        queue = self.dead_letter_queue(short)
        total = self._message_count(queue)
        channel = self._connection.channel()
        letters, last_tag = [], None
        try:
            while len(letters) < limit:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                last_tag = method.delivery_tag
                letters.append(rabbitmq_dead_letter(properties, body))
        finally:
            if last_tag is not None and channel.is_open:
                channel.basic_nack(last_tag, multiple=True, requeue=True)
            if channel.is_open:
                channel.close()
        return queue, max(total, len(letters)), letters

    def replay(self, short: str, limit: int) -> Iterator[DeadLetter]:
        """Move up to `limit` dead letters back to their queue, oldest first: each is published (with
        publisher confirms, mandatory) straight to the queue it came from, then acknowledged."""
        import pika

        queue, source = self.dead_letter_queue(short), self.source_queue(short)
        self._message_count(queue)
        self._message_count(source)
        channel = self._connection.channel()
        channel.confirm_delivery()
        try:
            for _ in range(limit):
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    return
                letter = rabbitmq_dead_letter(properties, body)
                try:
                    # The default exchange routes to `source` only: the platform's other subscribers of
                    # this event type got it the first time and do not get it again.
                    channel.basic_publish("", source, body, replay_properties(properties), mandatory=True)
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    raise OperatorError(
                        f"RabbitMQ did not take message {letter.message_id} for '{source}' "
                        f"({error.__class__.__name__}); it stays in '{queue}'"
                    ) from None
                channel.basic_ack(method.delivery_tag)
                yield letter
        finally:
            if channel.is_open:
                channel.close()

    def remaining(self, short: str) -> int:
        return self._message_count(self.dead_letter_queue(short))


def _text(value: Any) -> Any:
    """Received Service Bus properties arrive as bytes; outgoing ones must be str to mean the same."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _message_body(message: Any) -> bytes:
    from azure.servicebus.amqp import AmqpMessageBodyType

    if message.body_type != AmqpMessageBodyType.DATA:
        raise OperatorError(
            f"message {_text(message.message_id)} has an AMQP {message.body_type} body, not data; replay it by hand"
        )
    return b"".join(message.body)


def service_bus_dead_letter(message: Any) -> DeadLetter:
    properties = {_text(k): _text(v) for k, v in (message.application_properties or {}).items()}
    try:
        body_type, connection_id = ids_from_body(_message_body(message))
    except OperatorError:
        body_type, connection_id = None, None
    event_type = properties.get("type") if isinstance(properties.get("type"), str) else body_type
    return DeadLetter(
        message_id=_text(message.message_id),
        event_type=event_type,
        connection_id=None if connection_id is None else str(connection_id),
        delivery_count=message.delivery_count,
        reason=message.dead_letter_reason,
        description=message.dead_letter_error_description,
        enqueued_at=message.enqueued_time_utc,
        sequence_number=message.sequence_number,
    )


def replay_message(message: Any, queue: str) -> Any:
    """A new message with the dead letter's body, content type, application properties (minus the dead-letter
    reason/description) and session id: the same message, sent again. Its MessageId is the original's plus
    `.replay-<sequence number>`: duplicate detection (the refresh queue's) would drop the original MessageId for its
    whole history window, while replaying one dead letter twice is still absorbed. The event id in the body, which
    the handler's claim keys on, is unchanged."""
    from azure.servicebus import ServiceBusMessage

    body = _message_body(message)
    properties = {
        _text(k): _text(v)
        for k, v in (message.application_properties or {}).items()
        if _text(k) not in SERVICE_BUS_DEAD_LETTER_PROPERTIES
    }
    original_id = _text(message.message_id)
    return ServiceBusMessage(
        body,
        message_id=replayed_message_id(original_id, message.sequence_number, queue),
        content_type=_text(message.content_type),
        correlation_id=_text(message.correlation_id),
        subject=_text(message.subject),
        application_properties=properties or None,
        session_id=_text(message.session_id),
    )


def replayed_message_id(original_id: str | None, sequence_number: int | None, queue: str) -> str | None:
    """The MessageId a replayed dead letter is sent with (see replay_message); None lets the SDK choose one."""
    if original_id is None:
        return None
    return f"{original_id}.replay-{sequence_number or 0}"[:128]


class ServiceBusDeadLetters:
    """The dead-letter sub-queue of each trigger queue (`<queue>/$deadletterqueue`)."""

    transport = "Service Bus"

    def __init__(self, client: Any, scrub: Scrubber):
        self._client = client
        self._scrub = scrub

    def __enter__(self) -> ServiceBusDeadLetters:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    @staticmethod
    def source_queue(short: str) -> str:
        return SERVICE_BUS_QUEUES[QUEUE_EVENT_TYPES[short]]

    def dead_letter_queue(self, short: str) -> str:
        return self.source_queue(short) + "/$deadletterqueue"

    def _receiver(self, short: str) -> Any:
        from azure.servicebus import ServiceBusSubQueue

        return self._client.get_queue_receiver(self.source_queue(short), sub_queue=ServiceBusSubQueue.DEAD_LETTER)

    def peek(self, short: str, limit: int) -> tuple[str, int | None, list[DeadLetter]]:
        """Up to `limit` dead letters by sequence number, browsed (peek): nothing is locked or removed."""
        receiver = self._receiver(short)
        letters: list[DeadLetter] = []
        try:
            next_sequence = 0  # 0: from the start
            while len(letters) < limit:
                batch = receiver.peek_messages(
                    max_message_count=min(SERVICE_BUS_PAGE, limit - len(letters)), sequence_number=next_sequence
                )
                if not batch:
                    break
                letters.extend(service_bus_dead_letter(message) for message in batch)
                next_sequence = batch[-1].sequence_number + 1
        finally:
            receiver.close()
        return self.dead_letter_queue(short), None, letters[:limit]

    def replay(self, short: str, limit: int) -> Iterator[DeadLetter]:
        """Receive (peek-lock) up to `limit` dead letters; send each again to its queue, then complete it.
        A message that cannot be sent is abandoned: it stays in the dead-letter queue."""
        from azure.core.exceptions import AzureError

        queue = self.source_queue(short)
        receiver = self._receiver(short)
        sender = self._client.get_queue_sender(queue)
        done = 0
        try:
            while done < limit:
                batch = receiver.receive_messages(
                    max_message_count=min(SERVICE_BUS_PAGE, limit - done), max_wait_time=SERVICE_BUS_RECEIVE_WAIT_S
                )
                if not batch:
                    return
                for position, message in enumerate(batch):
                    letter = service_bus_dead_letter(message)
                    try:
                        sender.send_messages(replay_message(message, queue))
                    except AzureError as error:  # ServiceBusError and credential errors
                        for unsent in batch[position:]:
                            with contextlib.suppress(Exception):
                                receiver.abandon_message(unsent)
                        raise OperatorError(
                            f"could not send message {letter.message_id} back to '{queue}' "
                            f"({describe_error(error, self._scrub)}); it stays in the dead-letter queue"
                        ) from None
                    receiver.complete_message(message)
                    done += 1
                    yield letter
        finally:
            sender.close()
            receiver.close()

    def remaining(self, short: str) -> int | None:
        return None  # counting needs the management API (Manage rights); see the portal's queue overview


def dead_letters(
    settings: Settings,
    *,
    queues: list[str],
    transport: str,
    replay: bool,
    limit: int,
    queue_prefix: str | None,
    client: Any = None,
) -> int:
    """List (default) or replay the dead letters of `queues` on `transport`."""
    scrub = Scrubber(settings)
    store: RabbitMqDeadLetters | ServiceBusDeadLetters
    if transport == "rabbitmq":
        if settings.rabbitmq_url is None:
            raise SettingsError("dead-letters --transport rabbitmq needs RABBITMQ_URL (the local host's broker)")
        prefix = DEFAULT_QUEUE_PREFIX if queue_prefix is None else queue_prefix
        store = RabbitMqDeadLetters(settings.rabbitmq_url.get_secret_value(), prefix, scrub)
        print(f"Dead letters on RabbitMQ (local host queues, prefix '{prefix}'):")
    else:
        if not settings.service_bus_configured:
            raise SettingsError(
                "dead-letters --transport service-bus needs ServiceBusConnection or "
                "ServiceBusConnection__fullyQualifiedNamespace"
            )
        store = ServiceBusDeadLetters(client if client is not None else service_bus_client(settings), scrub)
        print("Dead letters on Service Bus:")
    try:
        with store:
            for short in queues:
                if replay:
                    _replay_queue(store, short, limit, scrub)
                else:
                    _list_queue(store, short, limit, scrub)
    except OperatorError:
        raise
    except Exception as error:  # SDK/broker errors: one clear line, scrubbed (where and the fix when known)
        logger.debug("dead-letters failed", exc_info=True)
        known = explain(error, settings)
        raise known or OperatorError(f"{store.transport} failed: {describe_error(error, scrub)}") from None
    return 0


def _list_queue(store: RabbitMqDeadLetters | ServiceBusDeadLetters, short: str, limit: int, scrub: Scrubber) -> None:
    queue, total, letters = store.peek(short, limit)
    if not letters:
        print(f"{short}: no dead letters in '{queue}'")
        return
    if total is not None:
        count = f"{total} dead letter(s)" + (f", showing the first {len(letters)}" if total > len(letters) else "")
    else:
        count = f"{len(letters)} dead letter(s)" + (
            " shown; more may exist (raise --limit)" if len(letters) >= limit else ""
        )
    print(f"{short}: {count} in '{queue}' (listing leaves them in place)")
    for number, letter in enumerate(letters, 1):
        for line in format_dead_letter(number, letter, scrub):
            print(line)


def _replay_queue(store: RabbitMqDeadLetters | ServiceBusDeadLetters, short: str, limit: int, scrub: Scrubber) -> None:
    queue, source = store.dead_letter_queue(short), store.source_queue(short)
    replayed = 0
    for letter in store.replay(short, limit):
        if replayed == 0:
            print(f"{short}: replaying from '{queue}' to '{source}'")
        replayed += 1
        for line in format_dead_letter(replayed, letter, scrub):
            print(line)
    if replayed == 0:
        print(f"{short}: no dead letters in '{queue}'; nothing replayed")
        return
    remaining = store.remaining(short)
    left = f"; {remaining} left in the dead-letter queue" if remaining is not None else ""
    print(f"{short}: replayed {replayed} message(s) to '{source}'{left}")
    if isinstance(store, ServiceBusDeadLetters) and short == "refresh-requested":
        print(
            "  note: replayed with MessageId <original>.replay-<sequence number>, which the refresh queue's duplicate "
            "detection lets through once (a second replay of the same dead letter is absorbed); the request's claim "
            "decides whether integration-manager is called again."
        )
