"""Bad input, one table per kind of input: application settings, trigger messages, Cosmos documents
and integration-manager answers (issue 3, item 8).

Every row is (input, defined outcome) and is driven through the real entry point: the functions'
own `main()` with real `azure.functions` trigger objects, the local host (for redelivery and
dead-lettering), real RabbitMQ, the Cosmos-compatible server and the stand-in integration-manager.
Every row also checks that the error text is clear, and that the bad input does not take the host
down: right after it, a good input still works in the same process.

Outcomes:
- settings        -> `SettingsError` naming the setting and saying what is wrong with it;
- messages        -> `InvalidEventError` with a short reason; the local host retries the message up
                     to its delivery limit, then dead-letters it with that reason;
- documents       -> skipped with a warning `Skipping connection '<id>': ...` (counted invalid), not
                     selected at all, refreshed, or `refresh.failed` without a call (unsafe ids);
- manager answers -> `refreshed`, `refresh.failed` (error code, retryable, httpStatus), or a retry
                     later (the message is redelivered); redirects are never followed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pika
import pytest
from azure.functions.timer import TimerRequest

import check_expiring_timer
import manager_check_handler
import sync_refresh_handler
from localdev.local_host import LocalHost
from localdev.stand_in_manager import Answer, StandInManager
from shared import check_timer, runtime
from shared.errors import InvalidEventError, RefreshRetryLaterError, SettingsError
from shared.events import (
    CHECK_EXPIRING,
    MAX_EVENT_BYTES,
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    REFRESHED,
    CheckExpiringData,
    RefreshRequestedData,
    make_event,
)
from shared.ids import refresh_request_id
from shared.settings import load_settings
from shared.times import utc_now
from tests.support.helpers import MISSING, invoke, iso, raw_event, refresh_request, trigger


def check_body(threshold: timedelta = timedelta(minutes=65)) -> bytes:
    now = utc_now()
    return make_event(CheckExpiringData(timestamp=now, threshold_time=now + threshold)).to_json()


def seed_connection(container, connection_id: str, **overrides: Any) -> dict:
    """A connection due in 5 minutes (fields in `overrides` replace or, with MISSING, remove its fields)."""
    document = {
        "id": connection_id,
        "tenantId": "t-1",
        "integrationId": "github",
        "status": "active",
        "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": iso(utc_now() + timedelta(minutes=5))},
    }
    for name, value in overrides.items():
        if name == "expiresAt":
            if value is MISSING:
                document["oauth"].pop("expiresAt")
            else:
                document["oauth"]["expiresAt"] = value
        elif value is MISSING:
            document.pop(name)
        else:
            document[name] = value
    container.upsert_item(document)
    return document


def refresh_body(container, connection_id: str) -> bytes:
    """A refresh-requested message for a connection that exists in Cosmos with that expiry."""
    document = seed_connection(container, connection_id)
    expires_at = datetime.fromisoformat(document["oauth"]["expiresAt"])
    return refresh_request(connection_id, "github", "t-1", expires_at).to_json()


def published_message_ids(event_tap) -> list[str]:
    """Message ids of everything on the exchange since the last drain, bodies unparsed (poison included)."""
    ids = []
    while (delivery := event_tap.channel.basic_get(event_tap.queue, auto_ack=True))[0] is not None:
        ids.append(delivery[1].message_id)
    return ids


def outcome_events(event_tap) -> dict[str, list[dict]]:
    by_type: dict[str, list[dict]] = {}
    for captured in event_tap.drain():
        by_type.setdefault(captured.routing_key, []).append(captured.body)
    return by_type


# =================================================================================================
# 1. Application settings
# =================================================================================================


@dataclass(frozen=True)
class BadSetting:
    """`values` replace good settings (blank = unset); the `entry` function is the first to need them.
    Outcome: SettingsError naming `names` and saying `says`; nothing published; once the setting is
    fixed the same function works. `restart`: the settings themselves loaded (a client could not be
    built), so the fix needs the host restart an application-setting change causes anyway."""

    values: dict[str, str]
    entry: str  # "timer", "check" or "refresh"
    names: str
    says: str
    restart: bool = False


SB_KEYED = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc="

SETTINGS_TABLE = [
    pytest.param(BadSetting({"TOKEN_REFRESH_ENABLED": "maybe"}, "timer", "TOKEN_REFRESH_ENABLED", "true or false"),
                 id="enabled-not-a-boolean"),
    pytest.param(BadSetting({"TOKEN_REFRESH_INTERVAL_MS": "1h"}, "timer", "TOKEN_REFRESH_INTERVAL_MS",
                            "whole number of milliseconds"), id="interval-with-a-unit"),
    pytest.param(BadSetting({"TOKEN_REFRESH_INTERVAL_MS": "999"}, "timer", "TOKEN_REFRESH_INTERVAL_MS",
                            "from 1000"), id="interval-below-one-second"),
    pytest.param(BadSetting({"TOKEN_REFRESH_INTERVAL_MS": "1" + "0" * 20}, "timer", "TOKEN_REFRESH_INTERVAL_MS",
                            "expected"), id="interval-absurdly-large"),
    pytest.param(BadSetting({"TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "-1"}, "timer",
                            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "from 0"), id="threshold-negative"),
    pytest.param(BadSetting({"TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "1" + "0" * 15}, "timer",
                            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "expected"), id="threshold-30000-years"),
    pytest.param(BadSetting({"TOKEN_REFRESH_PAGE_SIZE": "1001"}, "timer", "TOKEN_REFRESH_PAGE_SIZE",
                            "from 1 to 1000"), id="page-size-too-big"),
    pytest.param(BadSetting({"COSMOS_ENDPOINT": "http://acct.documents.azure.com:443/", "COSMOS_EMULATOR": ""},
                            "timer", "COSMOS_ENDPOINT", "https://"), id="cosmos-endpoint-plain-http"),
    pytest.param(BadSetting({"COSMOS_EMULATOR": "false"}, "timer", "COSMOS_ENDPOINT",
                            "set COSMOS_EMULATOR=true"), id="cosmos-loopback-without-emulator-flag"),
    pytest.param(BadSetting({"COSMOS_ENDPOINT": "https://acct.documents.azure.com:443/"}, "timer",
                            "COSMOS_EMULATOR", "only allowed with a loopback"), id="cosmos-emulator-flag-on-real-host"),
    pytest.param(BadSetting({"COSMOS_ENDPOINT": ""}, "check", "COSMOS_ENDPOINT", "is not set", restart=True),
                 id="cosmos-endpoint-missing"),
    pytest.param(BadSetting({"RABBITMQ_URL": "http://guest:guest@127.0.0.1:5672/"}, "timer", "RABBITMQ_URL",
                            "amqp://"), id="rabbitmq-url-wrong-scheme"),
    pytest.param(BadSetting({"RABBITMQ_URL": "amqp://"}, "timer", "RABBITMQ_URL", "amqp://"),
                 id="rabbitmq-url-without-host"),
    pytest.param(BadSetting({"RABBITMQ_URL": ""}, "timer", "RABBITMQ_URL", "No event transport", restart=True),
                 id="no-transport-at-all"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_URL": "im.example.com/api"}, "timer", "INTEGRATION_MANAGER_URL",
                            "http:// or https://"), id="manager-url-without-scheme"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_URL": "https://im.example.com/api?tenant=1"}, "timer",
                            "INTEGRATION_MANAGER_URL", "query or fragment"), id="manager-url-with-query"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_URL": "https://svc:pw@im.example.com"}, "timer",
                            "INTEGRATION_MANAGER_URL", "credentials"), id="manager-url-with-credentials"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_URL": ""}, "refresh", "INTEGRATION_MANAGER_URL", "is not set",
                            restart=True), id="manager-url-missing"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "0"}, "timer",
                            "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS", "from 100 to 60000"),
                 id="manager-connect-timeout-zero"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_TIMEOUT_MS": "forever"}, "timer", "INTEGRATION_MANAGER_TIMEOUT_MS",
                            "whole number of milliseconds"), id="manager-timeout-not-a-number"),
    pytest.param(BadSetting({"INTEGRATION_MANAGER_MAX_ATTEMPTS": "11"}, "timer", "INTEGRATION_MANAGER_MAX_ATTEMPTS",
                            "from 1 to 10"), id="manager-attempts-too-many"),
    pytest.param(BadSetting({"TOKEN_REFRESH_MAX_DELIVERY_COUNT": "0"}, "timer", "TOKEN_REFRESH_MAX_DELIVERY_COUNT",
                            "from 1 to 100"), id="max-delivery-count-zero"),
    pytest.param(BadSetting({"ServiceBusConnection": "Endpoint=https://ns.servicebus.windows.net/;SharedAccessKey=x"},
                            "timer", "ServiceBusConnection", "Endpoint=sb://"), id="service-bus-not-sb-endpoint"),
    pytest.param(BadSetting({"ServiceBusConnection__fullyQualifiedNamespace": "sb://ns.servicebus.windows.net/"},
                            "timer", "ServiceBusConnection__fullyQualifiedNamespace", "host name"),
                 id="service-bus-namespace-is-a-url"),
    pytest.param(BadSetting({"ServiceBusConnection": SB_KEYED,
                             "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net"},
                            "timer", "ServiceBusConnection__fullyQualifiedNamespace", "Set only one"),
                 id="service-bus-key-and-identity-both"),
]  # fmt: skip


def run_entry(entry: str, container, event_tap, delivery_count: int = 1) -> None:
    if entry == "timer":
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    elif entry == "check":
        invoke(manager_check_handler, trigger(check_body(), delivery_count))
    else:
        invoke(sync_refresh_handler, trigger(refresh_body(container, "conn-settings"), delivery_count))


@pytest.mark.parametrize("case", SETTINGS_TABLE)
def test_bad_setting(case: BadSetting, app_env, monkeypatch, cosmos_container, event_tap, manager, caplog):
    for name, value in case.values.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        run_entry(case.entry, cosmos_container, event_tap)
    message = str(raised.value)
    assert case.names in message, message
    assert case.says in message, message
    assert len(message) < 600 and "\n" not in message, message  # one readable line
    assert event_tap.drain() == []
    assert manager.calls == []

    # Fix the setting: the same function now works.
    for name in case.values:
        if name in app_env:
            monkeypatch.setenv(name, app_env[name])
        else:
            monkeypatch.delenv(name)
    if case.restart:  # an application-setting change restarts the host: a new process, new clients
        runtime.reset()
        monkeypatch.setattr(check_timer, "cadence", check_timer.CheckCadence())
    with caplog.at_level(logging.INFO):
        run_entry(case.entry, cosmos_container, event_tap, delivery_count=2)
    published = outcome_events(event_tap)
    if case.entry == "timer":
        assert len(published[CHECK_EXPIRING]) == 1
    elif case.entry == "check":
        assert "Check-expiring run finished" in caplog.text
    else:
        assert [e["data"]["connectionId"] for e in published[REFRESHED]] == ["conn-settings"]


def test_a_check_that_could_not_be_published_runs_on_the_next_tick(app_env, rabbitmq, monkeypatch, event_tap):
    """The broker refuses the app's credentials for a while (an outage, a rotated password): the tick
    fails with a clear PublishError, and the next tick publishes the check instead of waiting a whole
    TOKEN_REFRESH_INTERVAL_MS (tokens due in between would expire unrefreshed)."""
    user, password = f"bad-input-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    monkeypatch.setenv("RABBITMQ_URL", app_env["RABBITMQ_URL"].replace("guest:guest@", f"{user}:{password}@"))
    with pytest.raises(Exception, match=r"could not publish 1 event\(s\) \(rabbitmq: ") as raised:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    assert password not in str(raised.value)
    rabbitmq.ctl("add_user", user, password)
    rabbitmq.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    try:
        invoke(check_expiring_timer, TimerRequest(past_due=False))  # the next tick, a minute later
        assert len(event_tap.of_type(CHECK_EXPIRING)) == 1
    finally:
        rabbitmq.ctl("delete_user", user)


# =================================================================================================
# 2. Trigger messages
# =================================================================================================


def envelope(event_type: str, data: Any = MISSING, **changes: Any) -> dict:
    """A valid event of `event_type` (as JSON), with envelope fields changed or removed (MISSING)."""
    now = utc_now()
    if event_type == CHECK_EXPIRING:
        valid_data: Any = {"timestamp": iso(now), "thresholdTime": iso(now + timedelta(hours=1))}
    else:
        valid_data = {
            "connectionId": "conn-x",
            "integrationId": "github",
            "tenantId": "t-1",
            "expiresAt": iso(now + timedelta(minutes=5)),
            "requestedAt": iso(now),
        }
    return raw_event(event_type, valid_data if data is MISSING else data, **changes)


def check_with(**changes: Any) -> bytes:
    return json.dumps(envelope(CHECK_EXPIRING, **changes)).encode()


def refresh_with(*, bound_id: bool = True, **data_changes: Any) -> bytes:
    """A refresh request with `data_changes`; its id bound to the data as the check derives it, when the
    data is valid enough to derive one (`bound_id=False`: a random id)."""
    data = envelope(REFRESH_REQUESTED)["data"]
    for name, value in data_changes.items():
        if value is MISSING:
            data.pop(name)
        else:
            data[name] = value
    changes = {}
    try:
        request = RefreshRequestedData.model_validate(data)
    except ValueError:
        request = None
    if bound_id and request is not None and request.expires_at is not None:
        changes["id"] = refresh_request_id(request, request.expires_at)
    return json.dumps(envelope(REFRESH_REQUESTED, data=data, **changes)).encode()


@dataclass(frozen=True)
class PoisonMessage:
    """Outcome: the function raises InvalidEventError whose short reason contains `says` (and logs a
    `Poison message` line); the local host retries it up to the delivery limit, then dead-letters it
    with that reason; nothing is published and integration-manager is not called."""

    queue: str
    body: bytes
    says: str


LATIN_1_CHECK = json.dumps(envelope(CHECK_EXPIRING, source="intégration"), ensure_ascii=False).encode("latin-1")

MESSAGE_TABLE = [
    pytest.param(PoisonMessage(CHECK_EXPIRING, b"{not json", "not UTF-8 JSON (JSONDecodeError)"), id="not-json"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, b"", "not UTF-8 JSON"), id="empty-body"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, b"null", "not a JSON object"), id="json-null"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, b'[{"specversion": "1.0"}]', "not a JSON object"),
                 id="json-array-envelope"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, LATIN_1_CHECK, "not UTF-8 JSON (UnicodeDecodeError)"),
                 id="latin-1-not-utf-8"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, b"\xc3\x28\xa0\xa1 binary", "not UTF-8 JSON"),
                 id="binary-garbage"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(specversion="0.3"), "specversion"),
                 id="cloudevents-0.3-envelope"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(time=MISSING), "time: Field required"),
                 id="envelope-without-time"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(id="x" * 129), "id: String should have at most 128"),
                 id="envelope-id-too-long"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, json.dumps({"timestamp": "2026-11-26T14:00:00Z"}).encode(),
                               "not a CloudEvents 1.0 envelope"), id="bare-payload-without-envelope"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(data=["timestamp"]), "data"), id="data-is-a-list"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, json.dumps(envelope(REFRESH_REQUESTED)).encode(),
                               "expected 'integration.token.check-expiring'"), id="event-for-the-other-queue"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, check_with(type="integration.token.exploded"),
                               "event type is 'integration.token.exploded'"), id="unknown-event-type"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(data={"timestamp": "2026-11-26T14:00:00Z"}),
                               "thresholdTime: Field required"), id="check-without-threshold"),
    pytest.param(PoisonMessage(CHECK_EXPIRING, check_with(data={"timestamp": "2026-11-26T14:00:00Z",
                                                                "thresholdTime": "next tuesday"}), "thresholdTime"),
                 id="check-threshold-not-a-time"),
    pytest.param(
        PoisonMessage(REFRESH_REQUESTED, refresh_with(bound_id=False), "request id does not match its connection"),
        id="refresh-id-not-bound-to-its-connection",
    ),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(connectionId=MISSING), "connectionId: Field required"),
                 id="refresh-without-connection-id"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(connectionId=12345), "connectionId"),
                 id="refresh-connection-id-a-number"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(tenantId=""), "tenantId"), id="refresh-empty-tenant"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(integrationId={"id": "github"}), "integrationId"),
                 id="refresh-integration-id-an-object"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(requestedAt=True), "requestedAt"),
                 id="refresh-requested-at-a-boolean"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, refresh_with(connectionId="c" * 5000), "at most 1024"),
                 id="refresh-connection-id-5000-chars"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, b"{" + b" " * MAX_EVENT_BYTES + b"}", "over the 65536-byte limit"),
                 id="body-over-64-KiB"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, b"[" * 60_000, "JSON"),
                 id="json-nested-60000-deep"),
    pytest.param(PoisonMessage(REFRESH_REQUESTED, check_with(type="integration.token." + "x" * 60_000),
                               "type: String should have at most 256 characters"), id="event-type-60000-chars"),
]  # fmt: skip

FUNCTIONS = {CHECK_EXPIRING: manager_check_handler, REFRESH_REQUESTED: sync_refresh_handler}


@dataclass
class HostUnderTest:
    host: LocalHost
    channel: Any  # the host's own channel
    exchange: str
    publisher: Any  # a channel in confirm mode: a publish returns once the broker has queued the message

    def function(self, event_type: str) -> Any:
        return next(f for f in self.host.functions if f.event_type == event_type)

    def publish(self, event_type: str, body: bytes, message_id: str | None = None) -> None:
        properties = pika.BasicProperties(message_id=message_id, delivery_mode=pika.DeliveryMode.Persistent)
        self.publisher.basic_publish(self.exchange, event_type, body, properties)


@pytest.fixture
def local_host(app_env, rabbitmq):
    """The local host (RabbitMQ in the role of Service Bus) with its own queues, in this process."""
    host = LocalHost(load_settings(), queue_prefix=f"bad-input-{uuid.uuid4().hex[:8]}.")
    channel = host.connect()
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    publisher = connection.channel()
    publisher.confirm_delivery()
    yield HostUnderTest(host, channel, app_env["RABBITMQ_EXCHANGE"], publisher)
    connection.close()
    host.close()


def deliver_all(under_test: HostUnderTest, queue: str) -> list[bool]:
    """Invoke the queue's function on each message until the queue is empty (redeliveries included)."""
    results = []
    while (delivery := under_test.channel.basic_get(queue))[0] is not None:
        results.append(under_test.host.invoke(queue, *delivery))
    return results


@pytest.mark.parametrize("case", MESSAGE_TABLE)
def test_poison_message(case: PoisonMessage, local_host, app_env, cosmos_container, manager, event_tap, caplog):
    function = local_host.function(case.queue)

    # The function itself: a clear, short reason, and one "Poison message" line naming the queue.
    with caplog.at_level(logging.INFO), pytest.raises(InvalidEventError) as raised:
        invoke(FUNCTIONS[case.queue], trigger(case.body, message_id="poison-direct"))
    reason = str(raised.value)
    assert case.says in reason, reason[:500]
    assert len(reason) <= 300, f"{len(reason)}-character reason: {reason[:300]}..."
    [poison_line] = [r.getMessage() for r in caplog.records if "Poison message poison-direct" in r.getMessage()]
    assert f"on the {case.queue} queue" in poison_line

    # Through the host: retried up to the delivery limit, then dead-lettered with the reason.
    local_host.publish(case.queue, case.body, message_id="poison-1")
    assert deliver_all(local_host, function.queue) == [False] * local_host.host.max_deliveries
    method, properties, body = local_host.channel.basic_get(function.dead_letter_queue, auto_ack=True)
    assert method is not None, "not dead-lettered"
    assert body == case.body
    assert properties.message_id == "poison-1"
    description = properties.headers["x-dead-letter-error-description"]
    assert description.startswith("InvalidEventError: "), description[:300]
    assert case.says in description
    assert properties.headers["x-dead-letter-reason"] == "MaxDeliveryCountExceeded"
    assert set(published_message_ids(event_tap)) == {"poison-1"}  # the app published nothing
    assert manager.calls == []

    # The host is still up: a good message on the same queue is processed.
    good = check_body() if case.queue == CHECK_EXPIRING else refresh_body(cosmos_container, "conn-after-poison")
    local_host.publish(case.queue, good, message_id="good-1")
    assert deliver_all(local_host, function.queue) == [True]
    if case.queue == REFRESH_REQUESTED:
        assert [e["data"]["connectionId"] for e in event_tap.of_type(REFRESHED)] == ["conn-after-poison"]


def test_refresh_request_for_a_connection_that_no_longer_exists_is_acknowledged_without_a_call(
    local_host, app_env, manager, event_tap, caplog
):
    """Not poison: a valid request whose connection was deleted since. Nothing to do, nothing retried."""
    local_host.publish(REFRESH_REQUESTED, refresh_with(connectionId="gone"))
    with caplog.at_level(logging.INFO):
        assert deliver_all(local_host, local_host.function(REFRESH_REQUESTED).queue) == [True]
    assert "the connection no longer exists" in caplog.text
    assert manager.calls == []
    assert event_tap.of_type(REFRESH_FAILED) == [] and event_tap.of_type(REFRESHED) == []


# =================================================================================================
# 3. Cosmos documents
# =================================================================================================


@dataclass(frozen=True)
class Skipped:
    """Selected by the query but unusable: warning `Skipping connection '<id>': <says>`, counted as
    invalid; no request for it, and the rest of the page is still requested."""

    says: str


@dataclass(frozen=True)
class NotSelected:
    """Not due by the documented rules (no usable expiry, skipped status): no request, no warning."""


@dataclass(frozen=True)
class Refreshed:
    """Requested, then refreshed: exactly one call, to exactly this connection's endpoint."""

    integration_id: str | None = None  # as sent (numeric ids become text); default: the document's


@dataclass(frozen=True)
class RefusedId:
    """Requested, then `refresh.failed` with invalid_connection_id, retryable false, and no call."""


TEXT_OF_A_NUMBER = "1700000000000"
DOCUMENT_TABLE = [
    pytest.param({"integrationId": MISSING}, Skipped("missing or invalid integrationId"), id="integration-id-missing"),
    pytest.param({"integrationId": None}, Skipped("missing or invalid integrationId"), id="integration-id-null"),
    pytest.param({"integrationId": ""}, Skipped("missing or invalid integrationId"), id="integration-id-empty"),
    pytest.param({"integrationId": True}, Skipped("missing or invalid integrationId"), id="integration-id-boolean"),
    pytest.param({"integrationId": {"name": "github"}}, Skipped("missing or invalid integrationId"),
                 id="integration-id-object"),
    pytest.param({"integrationId": ["github"]}, Skipped("missing or invalid integrationId"), id="integration-id-list"),
    pytest.param({"integrationId": 4.5}, Skipped("missing or invalid integrationId"), id="integration-id-fraction"),
    pytest.param({"tenantId": 7}, Skipped("missing or invalid tenantId"), id="tenant-id-number"),
    pytest.param({"tenantId": ""}, Skipped("missing or invalid tenantId"), id="tenant-id-empty"),
    pytest.param(
        {"integrationId": "i" * 5000}, Skipped("missing or invalid integrationId"), id="integration-id-5000-chars"
    ),
    pytest.param({"expiresAt": "0000-garbage"},
                 Skipped("oauth.expiresAt is not an ISO-8601 time or an epoch number (ValueError)"),
                 id="expires-at-garbage"),
    pytest.param({"expiresAt": ""}, Skipped("oauth.expiresAt is not an ISO-8601 time"), id="expires-at-empty-string"),
    pytest.param({"expiresAt": TEXT_OF_A_NUMBER}, Skipped("oauth.expiresAt is not an ISO-8601 time"),
                 id="expires-at-epoch-as-text"),
    pytest.param({"expiresAt": "2026-02-30T10:00:00Z"}, Skipped("oauth.expiresAt is not an ISO-8601 time"),
                 id="expires-at-february-30"),
    pytest.param({"expiresAt": -1e20}, Skipped("oauth.expiresAt is not an ISO-8601 time"),
                 id="expires-at-epoch-out-of-range"),
    pytest.param({"expiresAt": None}, NotSelected(), id="expires-at-null"),
    pytest.param({"expiresAt": MISSING}, NotSelected(), id="expires-at-missing"),
    pytest.param({"expiresAt": {"at": "2026-01-01T00:00:00Z"}}, NotSelected(), id="expires-at-object"),
    pytest.param({"expiresAt": [1]}, NotSelected(), id="expires-at-list"),
    pytest.param({"oauth": "not-an-object"}, NotSelected(), id="oauth-a-string"),
    pytest.param({"oauth": MISSING}, NotSelected(), id="oauth-missing"),
    pytest.param({"status": "REVOKED"}, NotSelected(), id="status-revoked-in-capitals"),
    pytest.param({"status": 42}, Refreshed(), id="status-a-number"),
    pytest.param({"status": MISSING}, Refreshed(), id="status-missing"),
    pytest.param({"integrationId": 42}, Refreshed(integration_id="42"), id="integration-id-a-number"),
    pytest.param({"id": "ünïcødé-接続-😀"}, Refreshed(), id="id-unicode"),
    pytest.param({"id": "x" * 255}, Refreshed(), id="id-255-chars"),
    pytest.param({"integrationId": "i" * 1024}, Refreshed(), id="integration-id-1024-chars"),
    pytest.param({"id": "%2e%2e"}, Refreshed(), id="id-percent-encoded-dots"),
    pytest.param({"id": "..a"}, Refreshed(), id="id-dots-and-a-letter"),
    pytest.param({"integrationId": "a/../../admin"}, Refreshed(), id="integration-id-path-traversal"),
    pytest.param({"tenantId": "t-1\r\nX-Injected: 1"}, Refreshed(), id="tenant-id-header-injection"),
    pytest.param({"id": "."}, RefusedId(), id="id-one-dot"),
    pytest.param({"id": ".."}, RefusedId(), id="id-two-dots"),
    pytest.param({"id": "..."}, RefusedId(), id="id-three-dots"),
    pytest.param({"integrationId": ".."}, RefusedId(), id="integration-id-two-dots"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), DOCUMENT_TABLE)
def test_cosmos_document(fields, expected, app_env, cosmos_container, manager, event_tap, caplog):
    bad = seed_connection(cosmos_container, fields.get("id", "conn-bad"), **fields)
    bad_id = bad["id"]
    seed_connection(cosmos_container, "conn-good")

    with caplog.at_level(logging.INFO):
        invoke(manager_check_handler, trigger(check_body()))
        requests_ = event_tap.of_type(REFRESH_REQUESTED)
        for request in requests_:  # and each resulting refresh request, as the refresh queue would
            invoke(sync_refresh_handler, trigger(json.dumps(request).encode()))
    requested = {e["data"]["connectionId"] for e in requests_}
    published = outcome_events(event_tap)
    refreshed = {e["data"]["connectionId"] for e in published.get(REFRESHED, [])}
    failed = {e["data"]["connectionId"]: e["data"] for e in published.get(REFRESH_FAILED, [])}
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping connection")]

    # The good document of the same page is never affected.
    assert "conn-good" in refreshed
    assert [c.connection_id for c in manager.calls].count("conn-good") == 1
    calls = [c for c in manager.calls if c.connection_id == bad_id]

    if isinstance(expected, Skipped):
        [line] = skip_lines
        assert line.startswith(f"Skipping connection {bad_id!r}: "), line
        assert expected.says in line, line
        assert "invalid=1" in caplog.text
        assert requested == {"conn-good"} and calls == []
    elif isinstance(expected, NotSelected):
        assert skip_lines == []
        assert requested == {"conn-good"} and calls == []
    elif isinstance(expected, Refreshed):
        assert skip_lines == []
        assert requested == {"conn-good", bad_id}
        assert bad_id in refreshed and bad_id not in failed
        [call] = calls
        assert call.integration_id == (expected.integration_id or bad["integrationId"])
        assert call.body == {"tenantId": bad["tenantId"]}
        assert call.raw_path.count("/") == 7  # /api/v1/integrations/<one segment>/connections/<one segment>/refresh
        assert "X-Injected" not in call.headers
    else:
        assert skip_lines == []
        assert requested == {"conn-good", bad_id}
        assert calls == []
        error = failed[bad_id]["error"]
        assert (error["code"], failed[bad_id]["retryable"]) == ("invalid_connection_id", False)
        assert "only of dots" in error["message"]


# =================================================================================================
# 4. integration-manager answers
# =================================================================================================


@dataclass(frozen=True)
class Ok:
    """`refreshed`; its expiresAt is the one the answer carried, or the document's new one when the answer carried
    none usable (the manager refreshed the document: the refresh is verified by reading it)."""

    expires_at: str | None = None


@dataclass(frozen=True)
class Failed:
    """`refresh.failed` with this error code, retryable flag and httpStatus, after `attempts` calls; its
    message says what happened (status and short code, never the body)."""

    code: str
    retryable: bool
    http_status: int | None
    attempts: int = 1


@dataclass(frozen=True)
class RetryLater:
    """Transient failure on an early delivery: RefreshRetryLaterError, so the queue redelivers the message;
    no event yet."""

    calls: int


@dataclass(frozen=True)
class ManagerAnswer:
    answer: Callable[[str], Answer]  # given the URL of another host, for redirects
    expect: Ok | Failed | RetryLater
    delivery: int = 3  # the last delivery (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3): retryable failures are reported


HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>nginx</p></body></html>"
)
REFRESH_PATH = "/api/v1/integrations/github/connections/conn-bad/refresh"


def redirect(status: int, path: str = REFRESH_PATH) -> Callable[[str], Answer]:
    return lambda elsewhere: Answer(status, None, {"Location": elsewhere + path})


def fixed(answer: Answer) -> Callable[[str], Answer]:
    return lambda _elsewhere: answer


def raw(status: int, body: bytes, content_type: str = "text/html", **extra: Any) -> Callable[[str], Answer]:
    return fixed(Answer(status, raw_body=body, content_type=content_type, **extra))


MANAGER_TABLE = [
    pytest.param(ManagerAnswer(raw(200, b"OK", "text/plain"), Ok()), id="200-plain-text"),
    pytest.param(ManagerAnswer(raw(200, b""), Ok()), id="200-empty-body"),
    pytest.param(ManagerAnswer(raw(204, b""), Ok()), id="204-no-content"),
    pytest.param(ManagerAnswer(raw(200, b"null", "application/json"), Ok()), id="200-json-null"),
    pytest.param(ManagerAnswer(raw(200, b'["expiresAt"]', "application/json"), Ok()), id="200-json-array"),
    pytest.param(ManagerAnswer(raw(200, b'{"expiresAt": "2026-', "application/json"), Ok()), id="200-truncated-json"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"expiresAt": "soon"})), Ok()), id="200-expiry-not-a-time"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"expiresAt": -1e20})), Ok()), id="200-expiry-out-of-range"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"data": {"oauth": {"expiresAt": 1_800_000_000_000}}})),
                               Ok("2027-01-15T08:00:00.000Z")), id="200-nested-epoch-expiry"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"expiresAt": "2027-01-01T00:00:00Z", "pad": "x" * 2_000_000})),
                               Ok()), id="200-2-MB-body-not-read"),
    pytest.param(ManagerAnswer(raw(200, b"[" * 100_000, "application/json"), Ok()), id="200-json-nested-100000-deep"),
    # A 2xx that reports a failure, or leaves the expiry where it was, is no refresh (never done for the claim's life).
    pytest.param(ManagerAnswer(fixed(Answer(200, {"success": False, "error": "invalid_grant"}, keep_document=True)),
                               Failed("invalid_grant", False, 200)), id="200-failure-body-connection-code"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"ok": False, "error": {"code": "provider_down"}},
                                            keep_document=True)),
                               Failed("provider_down", True, 200)), id="200-failure-body-unknown-code"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"status": "error"}, keep_document=True)),
                               Failed("refresh_failed", True, 200)), id="200-failure-body-no-code"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"success": False, "error": "rate_limited"}, keep_document=True)),
                               Failed("rate_limited", True, 200, attempts=2)), id="200-failure-body-transient-code"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {}, keep_document=True)), Failed("refresh_unverified", True, 200)),
                 id="200-document-unchanged"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {"expiresAt": "2020-01-01T00:00:00Z"}, keep_document=True)),
                               Failed("refresh_unverified", True, 200)), id="200-stale-expiry-document-unchanged"),
    pytest.param(ManagerAnswer(raw(400, HTML_PAGE), Failed("refresh_rejected", True, 400)), id="400-html-page"),
    pytest.param(ManagerAnswer(raw(400, b"invalid_grant", "text/plain"), Failed("refresh_rejected", True, 400)),
                 id="400-bare-text-code"),
    pytest.param(ManagerAnswer(fixed(Answer(400, {"error": "invalid_grant", "pad": "x" * 300_000})),
                               Failed("refresh_rejected", True, 400)), id="400-huge-body-not-read"),
    pytest.param(ManagerAnswer(raw(401, b""), Failed("unauthorized", True, 401)), id="401-empty-body"),
    pytest.param(ManagerAnswer(fixed(Answer(403, {"error": "<script>alert(1)</script>"})),
                               Failed("forbidden", True, 403)), id="403-code-not-an-identifier"),
    pytest.param(ManagerAnswer(raw(500, HTML_PAGE), Failed("server_error", True, 500, attempts=2)),
                 id="500-html-page-last-delivery"),
    pytest.param(ManagerAnswer(raw(502, HTML_PAGE), RetryLater(calls=2), delivery=1),
                 id="502-html-page-early-delivery"),
    pytest.param(ManagerAnswer(fixed(Answer(429, None, {"Retry-After": "3600"})),
                               Failed("rate_limited", True, 429, attempts=1)), id="429-retry-after-an-hour"),
    pytest.param(ManagerAnswer(fixed(Answer(503, None, {"Retry-After": "whenever"})),
                               Failed("server_error", True, 503, attempts=2)), id="503-retry-after-garbage"),
    pytest.param(ManagerAnswer(fixed(Answer(200, {}, delay_s=1.0, keep_document=True)),
                               Failed("timeout", True, None, attempts=2)),
                 id="no-answer-in-time"),
    pytest.param(ManagerAnswer(fixed(Answer(drop_connection=True, keep_document=True)),
                               Failed("network_error", True, None, attempts=2)),
                 id="connection-closed-without-answer"),
    pytest.param(ManagerAnswer(redirect(301), Failed("redirect_refused", True, 301)), id="301-to-another-host"),
    pytest.param(ManagerAnswer(redirect(302), Failed("redirect_refused", True, 302)), id="302-to-another-host"),
    pytest.param(ManagerAnswer(redirect(303), Failed("redirect_refused", True, 303)), id="303-to-another-host"),
    pytest.param(ManagerAnswer(redirect(307), Failed("redirect_refused", True, 307)), id="307-to-another-host"),
    pytest.param(ManagerAnswer(redirect(308, "/steal?token=1"), Failed("redirect_refused", True, 308)),
                 id="308-to-another-host"),
    pytest.param(ManagerAnswer(fixed(Answer(307, None, {"Location": REFRESH_PATH + "/again"})),
                               Failed("redirect_refused", True, 307)), id="307-same-host-other-path"),
    pytest.param(ManagerAnswer(fixed(Answer(302)), Failed("redirect_refused", True, 302)), id="302-without-location"),
]  # fmt: skip


@pytest.mark.parametrize("case", MANAGER_TABLE)
def test_manager_answer(case: ManagerAnswer, app_env, monkeypatch, cosmos_container, manager, event_tap, caplog):
    monkeypatch.setenv("INTEGRATION_MANAGER_TIMEOUT_MS", "300")
    manager.container = cosmos_container  # a 2xx refreshes the document, as the real manager does
    with StandInManager() as elsewhere:
        manager.script = lambda call: case.answer(elsewhere.url)
        message = trigger(refresh_body(cosmos_container, "conn-bad"), delivery_count=case.delivery)
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            if isinstance(case.expect, RetryLater):
                with pytest.raises(RefreshRetryLaterError):
                    invoke(sync_refresh_handler, message)
            else:
                invoke(sync_refresh_handler, message)
        assert time.monotonic() - started < 10
        # Redirects are never followed: the other host saw no connection at all, let alone the token.
        assert elsewhere.sockets_accepted == 0 and elsewhere.calls == []
    published = outcome_events(event_tap)
    bad_calls = [c for c in manager.calls if c.connection_id == "conn-bad"]
    assert all(c.raw_path == REFRESH_PATH for c in manager.calls)

    expect = case.expect
    if isinstance(expect, Ok):
        [event] = published[REFRESHED]
        [refresh] = bad_calls
        assert refresh.refreshed
        assert event["data"].get("expiresAt") == (expect.expires_at or refresh.refreshed_to)
        assert REFRESH_FAILED not in published
        assert len(bad_calls) == 1
    elif isinstance(expect, Failed):
        [event] = published[REFRESH_FAILED]
        data = event["data"]
        assert (data["error"]["code"], data["retryable"], data["error"].get("httpStatus")) == (
            expect.code,
            expect.retryable,
            expect.http_status,
        )
        assert data["attempts"] == expect.attempts == len(bad_calls)
        text = data["error"]["message"]
        if expect.http_status is not None:
            assert text.startswith(f"integration-manager answered HTTP {expect.http_status}"), text
        else:
            assert "integration-manager" in text, text
        assert "<" not in text and "nginx" not in text and len(text) < 200, text  # never the body
        assert f"code={expect.code}" in caplog.text  # the "OAuth token refresh failed (...)" line
        assert REFRESHED not in published
    else:
        assert published == {}
        assert len(bad_calls) == expect.calls

    # Same process, a good answer: the next refresh works.
    manager.script = None
    invoke(sync_refresh_handler, trigger(refresh_body(cosmos_container, "conn-good")))
    assert [e["data"]["connectionId"] for e in event_tap.of_type(REFRESHED)] == ["conn-good"]
