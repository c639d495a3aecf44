"""The wire contract: CloudEvents envelopes, payload shapes, deterministic ids, strict parsing."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.errors import InvalidEventError
from shared.events import (
    CHECK_EXPIRING,
    MAX_EVENT_BYTES,
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    CheckExpiringData,
    ConnectionRef,
    RefreshError,
    RefreshFailedData,
    RefreshRequestedData,
    make_event,
    parse_event,
)
from shared.ids import refresh_request_id

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=UTC)


def request(**overrides):
    fields = {
        "connection_id": "conn-1",
        "integration_id": "salesforce",
        "tenant_id": "t-1",
        "expires_at": NOW + timedelta(minutes=30),
        "requested_at": NOW,
    } | overrides
    return RefreshRequestedData(**fields)


def test_envelope_is_cloudevents_structured_json_with_camel_case_payload():
    event = make_event(request(), time=NOW)
    body = json.loads(event.to_json())
    assert body == {
        "specversion": "1.0",
        "id": event.id,
        "source": "integration-token-refresh",
        "type": REFRESH_REQUESTED,
        "time": "2026-11-26T14:00:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "connectionId": "conn-1",
            "integrationId": "salesforce",
            "tenantId": "t-1",
            "expiresAt": "2026-11-26T14:30:00.000Z",
            "requestedAt": "2026-11-26T14:00:00.000Z",
        },
    }


def test_failed_event_carries_error_retryable_and_attempts():
    data = RefreshFailedData(
        connection_id="c",
        integration_id="i",
        tenant_id="t",
        failed_at=NOW,
        error=RefreshError(code="invalid_grant", message="integration-manager answered HTTP 400", http_status=400),
        retryable=False,
        attempts=2,
    )
    body = json.loads(make_event(data).to_json())
    assert body["type"] == REFRESH_FAILED
    assert body["data"]["error"] == {
        "code": "invalid_grant",
        "message": "integration-manager answered HTTP 400",
        "httpStatus": 400,
    }
    assert body["data"]["retryable"] is False
    assert body["data"]["attempts"] == 2


def test_times_in_other_offsets_are_normalised_to_utc():
    data = CheckExpiringData(
        timestamp=datetime(2026, 11, 26, 16, 0, tzinfo=timezone(timedelta(hours=2))), threshold_time=NOW
    )
    body = json.loads(make_event(data).to_json())
    assert body["data"]["timestamp"] == "2026-11-26T14:00:00.000Z"


def test_refresh_request_id_is_deterministic_per_connection_and_expiry():
    ref = ConnectionRef(connection_id="c", integration_id="i", tenant_id="t")
    expiry = NOW + timedelta(minutes=5)
    same_instant_other_offset = expiry.astimezone(timezone(timedelta(hours=-5)))
    assert refresh_request_id(ref, expiry) == refresh_request_id(ref, same_instant_other_offset)
    assert refresh_request_id(ref, expiry) != refresh_request_id(ref, expiry + timedelta(milliseconds=1))
    other = ConnectionRef(connection_id="c2", integration_id="i", tenant_id="t")
    assert refresh_request_id(ref, expiry) != refresh_request_id(other, expiry)
    # Field boundaries matter: ("ab","c") and ("a","bc") must not collide.
    a = ConnectionRef(connection_id="ab", integration_id="c", tenant_id="t")
    b = ConnectionRef(connection_id="a", integration_id="bc", tenant_id="t")
    assert refresh_request_id(a, expiry) != refresh_request_id(b, expiry)


def test_parse_round_trip():
    event = make_event(request())
    envelope, payload = parse_event(event.to_json(), REFRESH_REQUESTED)
    assert envelope.id == event.id
    assert payload == request(requested_at=payload.requested_at)


def valid_body(**changes):
    body = json.loads(make_event(request()).to_json())
    for key, value in changes.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not UTF-8 JSON"),
        (b"not json", "not UTF-8 JSON"),
        (b"\xff\xfe\x00", "not UTF-8 JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"{}", "not a CloudEvents 1.0 envelope"),
        (valid_body(specversion="0.3"), "specversion"),
        (valid_body(id=None), "id"),
        (valid_body(type=CHECK_EXPIRING), "expected 'integration.token.refresh-requested'"),
        (valid_body(type="integration.unknown"), "event type is 'integration.unknown'"),
        (valid_body(data={"connectionId": "c"}), "integrationId"),
        (
            valid_body(
                data={
                    "connectionId": 5,
                    "integrationId": "i",
                    "tenantId": "t",
                    "expiresAt": "2026-01-01T00:00:00Z",
                    "requestedAt": "2026-01-01T00:00:00Z",
                }
            ),
            "connectionId",
        ),
        (
            valid_body(
                data={
                    "connectionId": "c",
                    "integrationId": "i",
                    "tenantId": "t",
                    "expiresAt": "yesterday",
                    "requestedAt": "2026-01-01T00:00:00Z",
                }
            ),
            "expiresAt",
        ),
        (
            valid_body(
                data={
                    "connectionId": "",
                    "integrationId": "i",
                    "tenantId": "t",
                    "expiresAt": "2026-01-01T00:00:00Z",
                    "requestedAt": "2026-01-01T00:00:00Z",
                }
            ),
            "connectionId",
        ),
        (b"{" + b" " * MAX_EVENT_BYTES + b"}", "over the"),
    ],
)
def test_malformed_messages_get_a_clear_reason(body, reason):
    with pytest.raises(InvalidEventError, match=None) as raised:
        parse_event(body, REFRESH_REQUESTED)
    assert reason in str(raised.value)
