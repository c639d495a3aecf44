"""The wire contract: CloudEvents 1.0 envelopes (structured JSON mode) and typed payloads.

Every event the app publishes or consumes goes through these models, so a field name or shape can
only change here. Payload fields are camelCase on the wire, snake_case in Python.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError
from pydantic.alias_generators import to_camel

from shared.errors import InvalidEventError
from shared.ids import refresh_request_id
from shared.times import format_time, utc_now

logger = logging.getLogger(__name__)

SOURCE = "integration-token-refresh"
CONTENT_TYPE = "application/cloudevents+json"

CHECK_EXPIRING = "integration.token.check-expiring"
REFRESH_REQUESTED = "integration.token.refresh-requested"
REFRESHED = "integration.token.refreshed"
REFRESH_FAILED = "integration.token.refresh.failed"
SYSTEMIC_FAILURE = "integration.token.refresh.systemic-failure"

# Messages bigger than this are not events of ours: refuse them before parsing.
MAX_EVENT_BYTES = 64 * 1024


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A payload time: taken as UTC when it has no offset, written with milliseconds and a Z. A type of its
# own, so only time fields run Python code when an event is parsed or written (the refresh stage does
# both for every message).
UtcTime = Annotated[datetime, AfterValidator(_as_utc), PlainSerializer(format_time, return_type=str, when_used="json")]


class _Payload(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)
    event_type: ClassVar[str]


class CheckExpiringData(_Payload):
    """Payload of `integration.token.check-expiring`: when the run started and the expiry bound (UTC).
    `continuation` is set only on a follow-up check that resumes a scan which ran out of its time budget."""

    event_type: ClassVar[str] = CHECK_EXPIRING
    timestamp: UtcTime
    threshold_time: UtcTime
    # Set on a follow-up check that resumes a scan which reached its time budget (Cosmos continuation token).
    continuation: str | None = Field(None, max_length=48 * 1024)


class ConnectionRef(_Payload):
    """The three ids that name a connection, in every per-connection event."""

    connection_id: str = Field(min_length=1, max_length=1024)
    integration_id: str = Field(min_length=1, max_length=1024)
    tenant_id: str = Field(min_length=1, max_length=1024)


class RefreshRequestedData(ConnectionRef):
    """Payload of `integration.token.refresh-requested`: one connection to refresh. `expires_at` is the expiry the
    check saw, None for a token without expiry (TOKEN_REFRESH_MAX_AGE_MS); `not_before`, when set, the time the check
    scheduled it for (shared.refresh_schedule). With an expiry, the event id is
    derived from it (shared.ids.refresh_request_id) and parsing rejects an id that does not match; without, from
    the document's `_ts`, which the claim checks instead."""

    event_type: ClassVar[str] = REFRESH_REQUESTED
    expires_at: UtcTime | None = None  # absent for tokens without expiry (TOKEN_REFRESH_MAX_AGE_MS)
    requested_at: UtcTime
    # When the check scheduled the refresh (TOKEN_REFRESH_RATE_LIMITS / TOKEN_REFRESH_SPREAD_MS): the transport that
    # triggers the refresh function delivers it then; absent when it is due at once. Not part of the event id.
    not_before: UtcTime | None = None
    # How many times a check asked again for this request after it had ended retryable (absent: never). Part of
    # the Service Bus MessageId, not of the event id: duplicate detection absorbs a copy of the same round (an
    # overlapping check, a re-sent batch) and lets a later round through (shared.messaging.service_bus).
    attempt_round: int | None = Field(None, ge=1, le=1_000_000)


class RefreshedData(ConnectionRef):
    """Payload of `integration.token.refreshed`. `expires_at`: the new expiry when known (integration-manager's
    answer, or the connection document when the token had been refreshed already)."""

    event_type: ClassVar[str] = REFRESHED
    refreshed_at: UtcTime
    expires_at: UtcTime | None = None


class RefreshError(_Payload):
    """The `error` of refresh.failed: a short machine code (never text from integration-manager's body), a message
    of ours, and the HTTP status when there was an answer."""

    code: str
    message: str
    http_status: int | None = None


class RefreshFailedData(ConnectionRef):
    """Payload of `integration.token.refresh.failed`. `retryable` is false only for a failure of the connection
    itself (shared.failure_classes); `attempts` counts the calls made for the request, over all its deliveries."""

    event_type: ClassVar[str] = REFRESH_FAILED
    failed_at: UtcTime
    error: RefreshError
    retryable: bool
    attempts: int = Field(ge=1)


class SystemicFailureData(_Payload):
    """Many connections failed the same way within a window: a problem of ours or integration-manager's
    (e.g. a stale INTEGRATION_MANAGER_TOKEN), not of the connections. One per kind of failure and window."""

    event_type: ClassVar[str] = SYSTEMIC_FAILURE
    detected_at: UtcTime
    window_started_at: UtcTime
    code: str
    http_status: int | None = None
    connections: int = Field(ge=1)  # different connections that failed this way in the window so far
    check: str  # what to check, e.g. "INTEGRATION_MANAGER_TOKEN: integration-manager does not accept it"


PAYLOAD_TYPES: dict[str, type[_Payload]] = {
    model.event_type: model
    for model in (CheckExpiringData, RefreshRequestedData, RefreshedData, RefreshFailedData, SystemicFailureData)
}


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 envelope around one of the payloads above."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1, max_length=256)
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any]

    def to_json(self) -> bytes:
        """The event as sent on both transports: compact UTF-8 JSON (structured mode), `time` in milliseconds with
        a Z. Built once per event (the event is immutable): Service Bus and RabbitMQ send the same bytes."""
        return self._wire_json

    @cached_property
    def _wire_json(self) -> bytes:
        return json.dumps(self.wire_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def wire_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict, as it goes on the wire (what a claim stores as the outcome)."""
        body = self.model_dump(mode="json")
        body["time"] = format_time(self.time)
        return body

    def payload(self) -> _Payload:
        """`data` validated as its type's payload model. Raises InvalidEventError for a type the app does not know,
        pydantic's ValidationError for data that does not fit."""
        try:
            return PAYLOAD_TYPES[self.type].model_validate(self.data)
        except KeyError:
            raise InvalidEventError(f"unknown event type {self.type!r}") from None


def make_event(data: _Payload, event_id: str | None = None, time: datetime | None = None) -> CloudEvent:
    """An event of `data`'s type. Its id: `event_id`, else the deterministic id of a refresh request
    with an expiry (docs/events.md), else a random one."""
    if event_id is None and isinstance(data, RefreshRequestedData) and data.expires_at is not None:
        event_id = refresh_request_id(data, data.expires_at)
    return CloudEvent(
        id=event_id or str(uuid.uuid4()),
        source=SOURCE,
        type=data.event_type,
        time=time or utc_now(),
        data=data.model_dump(mode="json", by_alias=True, exclude_none=True),
    )


def request_id_matches(envelope: CloudEvent, request: RefreshRequestedData) -> bool:
    """A refresh request's id is bound to its connection and expiry (the check derives it from them).
    A request without expiry was identified by its document version, which the message does not carry:
    its binding is checked by the claim instead (StateStore.claim)."""
    return request.expires_at is None or envelope.id == refresh_request_id(request, request.expires_at)


def parse_event(body: bytes | str, expected_type: str) -> tuple[CloudEvent, Any]:
    """Parse and validate a message body as a CloudEvent of `expected_type`.

    Returns the envelope and its typed payload; raises InvalidEventError with a short reason
    (no message content, which could carry anything) when the body does not fit the contract.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEventError(f"message body is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
    try:
        # Decode explicitly: json.loads would also accept UTF-16/32, which the contract does not.
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InvalidEventError(f"message body is not UTF-8 JSON ({error.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise InvalidEventError("message body is not a JSON object")
    try:
        envelope = CloudEvent.model_validate(document)
    except ValidationError as error:
        raise InvalidEventError(f"not a CloudEvents 1.0 envelope: {_fields(error)}") from None
    if envelope.type != expected_type:
        raise InvalidEventError(f"event type is {envelope.type!r}, expected {expected_type!r}")
    try:
        payload = envelope.payload()
    except ValidationError as error:
        raise InvalidEventError(f"invalid {expected_type} data: {_fields(error)}") from None
    if isinstance(payload, RefreshRequestedData) and not request_id_matches(envelope, payload):
        raise InvalidEventError(
            "the request id does not match its connection and expiresAt (refresh request ids are derived from them)"
        )
    return envelope, payload


def parse_trigger_message(
    body: bytes | str, expected_type: str, message_id: str | None, delivery_count: int
) -> tuple[CloudEvent, Any]:
    """parse_event for a function's trigger message: a message that is not a valid event is a poison
    message; say so in one clear line, then raise so the queue dead-letters it after its delivery limit."""
    try:
        return parse_event(body, expected_type)
    except InvalidEventError as error:
        logger.error(
            "Poison message %s on the %s queue (delivery %d): %s. Retrying cannot help; it goes to the "
            "dead-letter queue when its delivery limit is reached.",
            message_id or "(no id)",
            expected_type,
            delivery_count,
            error,
        )
        raise


def _fields(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or 'body'}: {item['msg']}"
        for item in error.errors(include_input=False, include_url=False)
    )
