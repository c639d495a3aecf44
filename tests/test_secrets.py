"""No secret ever leaves the app, and TLS verification stays on (issue 3, item 6).

Canary test: every secret the app handles holds a unique canary string (token values in Cosmos
documents, INTEGRATION_MANAGER_TOKEN, the RabbitMQ password, COSMOS_KEY, the Service Bus
SharedAccessKey). Failures are then driven at every stage (bad settings, poison messages, bad
documents, integration-manager 4xx/5xx/timeouts/redirects/dropped connections whose bodies echo
the canaries, the CLI) and everything the app emits is captured: log records at DEBUG (SDK loggers
included) with their tracebacks, exception texts and reprs, every message on the RabbitMQ exchange,
dead-lettered messages' headers, CLI stdout/stderr. No canary may appear in any of it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import traceback
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pika
import pytest
import requests
from azure.functions.servicebus import ServiceBusMessage
from azure.functions.timer import TimerRequest

import check_expiring_timer
import manager_check_handler
import sync_refresh_handler
from shared import runtime
from shared.events import (
    CHECK_EXPIRING,
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    CheckExpiringData,
    InvalidEventError,
    make_event,
    utc_now,
)
from shared.local_host import LocalHost
from shared.manager_client import IntegrationManagerClient
from shared.messaging import publisher_from_settings
from shared.secrets import Scrubber
from shared.settings import SettingsError, load_settings
from shared.token_refresh import RefreshRetryLater
from tests.helpers import cli_environment, invoke, iso, raw_event, refresh_request, run_cli
from tools.stand_in_manager import Answer, StandInManager

CANARY = uuid.uuid4().hex  # in every secret below: finding it anywhere (even cut short) is a leak
ACCESS_TOKEN = f"at-{CANARY}"
REFRESH_TOKEN = f"rt-{CANARY}"
CLIENT_SECRET = f"cs-{CANARY}"
MANAGER_TOKEN = f"im-{CANARY}"
BROKER_PASSWORD = f"pw-{CANARY}"
SERVICE_BUS_KEY = f"sb-{CANARY}"
COSMOS_KEY = base64.b64encode(f"ck-{CANARY}".encode()).decode()  # account keys are base64
SECRETS = (CANARY, CANARY[:12], COSMOS_KEY, COSMOS_KEY[:16])
BROKER_USER = "token-refresh-canary"
SERVICE_BUS_CONNECTION = (
    f"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=send;SharedAccessKey={SERVICE_BUS_KEY}"  # nothing listens
)

SDK_LOGGERS = ("azure", "pika", "urllib3", "requests", "shared", "tools")


class Exposure:
    """Everything the app let out, by where it was seen."""

    def __init__(self, secrets: tuple[str, ...] = SECRETS) -> None:
        self.secrets = secrets
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, value: Any) -> None:
        self.texts.append((where, value if isinstance(value, str) else repr(value)))

    def add_error(self, where: str, error: BaseException) -> None:
        self.add(f"{where} str", str(error))
        self.add(f"{where} repr", repr(error))
        self.add(f"{where} traceback", "".join(traceback.format_exception(error)))

    def add_logs(self, where: str, caplog: pytest.LogCaptureFixture) -> None:
        self.add(f"{where} log text", caplog.text)  # formatted records, tracebacks included
        for record in caplog.records:
            self.add(f"{where} log record {record.name}", record.getMessage())
            self.add(f"{where} log args {record.name}", repr(record.args))

    def assert_clean(self) -> None:
        leaks = []
        for where, text in self.texts:
            for secret in self.secrets:
                if secret in text:
                    at = text.index(secret)
                    leaks.append(f"{where}: ...{text[max(0, at - 120) : at + 60]!r}...")
                    break
        assert not leaks, f"{len(leaks)} leak(s):\n" + "\n".join(leaks[:20])


@pytest.fixture
def debug_logs(caplog, monkeypatch):
    """caplog at DEBUG for the app and the SDKs (which the app otherwise keeps at WARNING)."""
    monkeypatch.setattr(runtime, "QUIET_LOGGERS", ())
    caplog.set_level(logging.DEBUG)
    for name in SDK_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.fixture(scope="module")
def broker_url_with_canary_password(rabbitmq):
    """A RabbitMQ user whose password is a canary (the node is this session's own)."""
    rabbitmq.ctl("add_user", BROKER_USER, BROKER_PASSWORD)
    rabbitmq.ctl("set_permissions", "-p", "/", BROKER_USER, ".*", ".*", ".*")
    yield rabbitmq.url.replace("guest:guest@", f"{BROKER_USER}:{BROKER_PASSWORD}@")
    rabbitmq.ctl("delete_user", BROKER_USER)


@pytest.fixture
def secret_env(app_env, monkeypatch, broker_url_with_canary_password):
    """The app's settings with a canary in every secret setting."""
    values = app_env | {
        "RABBITMQ_URL": broker_url_with_canary_password,
        "INTEGRATION_MANAGER_TOKEN": MANAGER_TOKEN,
        "COSMOS_KEY": COSMOS_KEY,  # the Cosmos-compatible server accepts any key; the SDK signs with it
        "INTEGRATION_MANAGER_TIMEOUT_MS": "300",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    return values


def connection(connection_id: str, **fields: Any) -> dict:
    document = {
        "id": connection_id,
        "tenantId": "t-secret",
        "integrationId": "slack",
        "status": "active",
        "oauth": {
            "accessToken": f"{ACCESS_TOKEN}-{connection_id}",
            "refreshToken": f"{REFRESH_TOKEN}-{connection_id}",
            "clientSecret": CLIENT_SECRET,
            "expiresAt": iso(utc_now() + timedelta(minutes=5)),
        },
    }
    document.update(fields)
    return document


def echoing_manager(elsewhere_url: str):
    """integration-manager answers, by connection id, that echo every secret they could know."""

    def script(call) -> Answer:
        bearer = call.headers.get("Authorization", "")
        echo = {
            "accessToken": ACCESS_TOKEN,
            "refreshToken": REFRESH_TOKEN,
            "client_secret": CLIENT_SECRET,
            "authorization": bearer,
        }
        html = f"<html><body>upstream said: {ACCESS_TOKEN} {REFRESH_TOKEN} ({bearer})</body></html>".encode()
        answers = {
            "ok": Answer(200, echo | {"expiresAt": iso(utc_now() + timedelta(hours=1))}),
            "ok-text": Answer(
                200, raw_body=f"refreshed {ACCESS_TOKEN} with {bearer}".encode(), content_type="text/plain"
            ),
            "rejected": Answer(
                400, {"error": "invalid_grant", "error_description": f"refresh token {REFRESH_TOKEN} revoked"} | echo
            ),
            "unauthorized": Answer(401, {"message": f"bad credentials: {bearer}"} | echo),
            "html-500": Answer(500, raw_body=html, content_type="text/html"),
            "down": Answer(503, {"code": "upstream_down", "detail": html.decode()}, {"Retry-After": "0"}),
            "redirect": Answer(
                307,
                None,
                {"Location": f"{elsewhere_url}/steal?access_token={ACCESS_TOKEN}&bearer={MANAGER_TOKEN}"},
            ),
            "slow": Answer(200, echo, delay_s=1.0),
            "dropped": Answer(drop_connection=True),
        }
        return answers.get(call.connection_id, Answer(200, echo))

    return script


GOOD = ("ok", "ok-text")
FAILING = ("rejected", "unauthorized", "html-500", "down", "redirect", "slow", "dropped")
UNUSABLE = [  # skipped with a warning; the values that make them unusable are canaries
    connection("bad-integration", integrationId={"token": ACCESS_TOKEN}),
    connection("bad-integration-list", integrationId=[REFRESH_TOKEN]),
    connection("bad-expiry", oauth={"accessToken": ACCESS_TOKEN, "expiresAt": f"0000-{REFRESH_TOKEN}"}),
    connection(
        "bad-expiry-suffix", oauth={"refreshToken": REFRESH_TOKEN, "expiresAt": f"2026-01-01T00:00{ACCESS_TOKEN}"}
    ),
]


def seed(container) -> None:
    for connection_id in (*GOOD, *FAILING, ".."):
        container.upsert_item(connection(connection_id))
    container.upsert_item(connection("revoked", status="revoked"))
    for document in UNUSABLE:
        container.upsert_item(document)


def poison_messages() -> dict[str, tuple[str, bytes]]:
    """Message id -> (queue event type, body): messages that carry canaries where fields should be."""
    now = utc_now()
    valid = {
        "connectionId": "gone",
        "integrationId": "slack",
        "tenantId": "t-secret",
        "expiresAt": iso(now),
        "requestedAt": iso(now),
    }

    def event(event_type: str, data: Any, **envelope: Any) -> bytes:
        return json.dumps(raw_event(event_type, data, **envelope)).encode()

    return {
        "poison-token-as-id": (
            REFRESH_REQUESTED,
            event(REFRESH_REQUESTED, valid | {"connectionId": {"t": ACCESS_TOKEN}}),
        ),
        "poison-token-as-expiry": (REFRESH_REQUESTED, event(REFRESH_REQUESTED, valid | {"expiresAt": REFRESH_TOKEN})),
        "poison-token-as-tenant": (
            REFRESH_REQUESTED,
            event(REFRESH_REQUESTED, valid | {"tenantId": 7, "x": REFRESH_TOKEN}),
        ),
        "poison-long-event-id": (REFRESH_REQUESTED, event(REFRESH_REQUESTED, valid, id=ACCESS_TOKEN * 4)),
        "poison-token-as-threshold": (
            CHECK_EXPIRING,
            event(CHECK_EXPIRING, {"timestamp": iso(now), "thresholdTime": ACCESS_TOKEN}),
        ),
        "poison-form-encoded": (REFRESH_REQUESTED, f"access_token={ACCESS_TOKEN}&bearer={MANAGER_TOKEN}".encode()),
        "poison-not-utf-8": (CHECK_EXPIRING, b"\xff\xfe" + REFRESH_TOKEN.encode("utf-16-le")[:-1]),
        "poison-oversized": (REFRESH_REQUESTED, event(REFRESH_REQUESTED, valid | {"pad": ACCESS_TOKEN * 2000})),
    }


def raw_messages(channel, queue: str) -> list[tuple[Any, bytes]]:
    messages = []
    while (delivery := channel.basic_get(queue, auto_ack=True))[0] is not None:
        messages.append((delivery[1], delivery[2]))
    return messages


def trigger(body: bytes, delivery_count: int = 1, message_id: str = "m-secret") -> ServiceBusMessage:
    return ServiceBusMessage(
        body=body, message_id=message_id, delivery_count=delivery_count, application_properties={}, user_properties={}
    )


# The whole pipeline, in process -------------------------------------------------------------------


def test_no_canary_in_logs_events_errors_or_dead_letters(
    secret_env, rabbitmq, cosmos_container, manager, event_tap, debug_logs
):
    exposure = Exposure()
    seed(cosmos_container)
    with StandInManager() as elsewhere:
        manager.script = echoing_manager(elsewhere.url)
        host = LocalHost(load_settings(), queue_prefix=f"secrets-{uuid.uuid4().hex[:8]}.")
        channel = host.connect()
        publisher_connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
        publisher = publisher_connection.channel()
        publisher.confirm_delivery()
        poisons = poison_messages()
        for message_id, (event_type, body) in poisons.items():
            publisher.basic_publish(
                secret_env["RABBITMQ_EXCHANGE"], event_type, body, pika.BasicProperties(message_id=message_id)
            )
        publisher_connection.close()

        summary = host.run_once()

        dead_letters = [m for f in host.functions for m in raw_messages(channel, f.dead_letter_queue)]
        host.close()
        assert elsewhere.sockets_accepted == 0  # the redirect was not followed
    exposure.add("cycle summary", summary)

    # Every stage really ran, with the secrets in use (so their absence below means something).
    called = {call.connection_id for call in manager.calls}
    assert called == set(GOOD) | set(FAILING)
    assert all(call.headers["Authorization"] == f"Bearer {MANAGER_TOKEN}" for call in manager.calls)
    assert (summary.refreshed, summary.failed) == (len(GOOD), len(FAILING) + 1)  # + the dot-only id
    assert summary.dead_lettered == len(poisons)
    assert debug_logs.text.count("Skipping connection") == len(UNUSABLE)

    # Everything on the exchange (except the poison messages this test put there).
    for captured_properties, body in raw_messages(event_tap.channel, event_tap.queue):
        exposure.add("exchange properties", captured_properties)
        if captured_properties.message_id not in poisons:
            exposure.add(f"exchange body {captured_properties.type}", body.decode("utf-8", "replace"))
    # Dead-lettered messages: their headers and properties (the body is the poison message itself).
    assert sorted(p.message_id for p, _ in dead_letters) == sorted(poisons)
    for dead_properties, body in dead_letters:
        assert body == poisons[dead_properties.message_id][1]
        exposure.add(f"dead-letter headers {dead_properties.message_id}", dead_properties)

    # Exceptions the functions raise, as a host would report them.
    with pytest.raises(InvalidEventError) as poison_error:
        invoke(sync_refresh_handler, trigger(poisons["poison-token-as-id"][1]))
    exposure.add_error("InvalidEventError", poison_error.value)
    cosmos_container.upsert_item(connection("down-again"))
    manager.script = lambda call: Answer(503, raw_body=f"{ACCESS_TOKEN} {call.headers['Authorization']}".encode())
    with pytest.raises(RefreshRetryLater) as retry_error:
        invoke(sync_refresh_handler, trigger(refresh_requested(cosmos_container, "down-again")))
    exposure.add_error("RefreshRetryLater", retry_error.value)

    exposure.add_logs("in-process", debug_logs)
    exposure.assert_clean()


def refresh_requested(container, connection_id: str) -> bytes:
    document = container.read_item(connection_id, partition_key="t-secret")
    expires_at = datetime.fromisoformat(document["oauth"]["expiresAt"])
    return refresh_request(connection_id, document["integrationId"], "t-secret", expires_at).to_json()


def test_an_error_code_that_echoes_a_token_is_not_copied_into_events_or_logs(
    secret_env, cosmos_container, manager, event_tap, debug_logs
):
    """integration-manager's `error`/`code` field becomes the event's error.code when it looks like a
    short identifier. A token can look like one: it must not travel on as the error code."""
    exposure = Exposure()
    cosmos_container.upsert_item(connection("echo-code"))
    manager.script = lambda call: Answer(400, {"error": ACCESS_TOKEN, "code": REFRESH_TOKEN})
    invoke(sync_refresh_handler, trigger(refresh_requested(cosmos_container, "echo-code")))
    [event] = event_tap.of_type(REFRESH_FAILED)
    # No usable code: a 400 without a connection error code is not held against the connection.
    assert (event["data"]["error"]["code"], event["data"]["retryable"]) == ("refresh_rejected", True)
    exposure.add("refresh.failed event", json.dumps(event))
    exposure.add_logs("refresh", debug_logs)
    exposure.assert_clean()


# Settings ----------------------------------------------------------------------------------------

SECRET_IN_BAD_SETTINGS = [
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://svc:{MANAGER_TOKEN}@im.example.com"},
                 id="manager-url-credentials"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://im.example.com/api?token={MANAGER_TOKEN}"},
                 id="manager-url-query"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://im.example.com/#{MANAGER_TOKEN}"}, id="manager-url-fragment"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"{MANAGER_TOKEN}"}, id="manager-token-pasted-as-url"),
    pytest.param({"RABBITMQ_URL": f"http://guest:{BROKER_PASSWORD}@127.0.0.1:5672/"}, id="rabbitmq-url-wrong-scheme"),
    pytest.param({"RABBITMQ_URL": f"amqp://guest:{BROKER_PASSWORD}@/"}, id="rabbitmq-url-without-host"),
    pytest.param({"RABBITMQ_URL": BROKER_PASSWORD}, id="rabbitmq-password-pasted-as-url"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION.replace("sb://", "https://")},
                 id="service-bus-not-sb"),
    pytest.param({"ServiceBusConnection": f"SharedAccessKeyName=send;SharedAccessKey={SERVICE_BUS_KEY}"},
                 id="service-bus-without-endpoint"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION,
                  "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net"},
                 id="service-bus-key-and-identity"),
    pytest.param({"ServiceBusConnection__fullyQualifiedNamespace": SERVICE_BUS_CONNECTION},
                 id="service-bus-string-as-namespace"),
    pytest.param({"COSMOS_KEY": COSMOS_KEY, "COSMOS_EMULATOR": "false"}, id="cosmos-key-loopback-without-emulator"),
    pytest.param({"COSMOS_KEY": COSMOS_KEY, "COSMOS_ENDPOINT": f"http://acct.documents.azure.com/{COSMOS_KEY}"},
                 id="cosmos-endpoint-not-https"),
    pytest.param({"TOKEN_REFRESH_INTERVAL_MS": MANAGER_TOKEN}, id="token-pasted-into-interval"),
    pytest.param({"TOKEN_REFRESH_ENABLED": BROKER_PASSWORD}, id="password-pasted-into-enabled"),
    pytest.param({"INTEGRATION_MANAGER_TIMEOUT_MS": SERVICE_BUS_KEY}, id="key-pasted-into-timeout"),
    pytest.param({"COSMOS_EMULATOR": COSMOS_KEY}, id="cosmos-key-pasted-into-emulator-flag"),
    # Accepted before, then quoted whole by requests' InvalidHeader in every delivery's error (issue 11).
    pytest.param({"INTEGRATION_MANAGER_TOKEN": f"{MANAGER_TOKEN[:20]}\n{MANAGER_TOKEN[20:]}"},
                 id="manager-token-with-a-line-break"),
    pytest.param({"COSMOS_KEY": f"{COSMOS_KEY[:10]} {COSMOS_KEY[10:]}"}, id="cosmos-key-with-a-space"),
    pytest.param({"RABBITMQ_URL": f"amqp://{BROKER_USER}:{BROKER_PASSWORD[:8]}\t{BROKER_PASSWORD[8:]}@127.0.0.1/"},
                 id="rabbitmq-password-with-a-tab"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION.replace("sb-", "sb-\x1b")},
                 id="service-bus-key-with-an-escape"),
]  # fmt: skip


def run_cli_verbose(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(env, "-v", *args, timeout=timeout)


@pytest.mark.parametrize("bad", SECRET_IN_BAD_SETTINGS)
def test_settings_errors_never_show_a_secret(bad, secret_env, monkeypatch, debug_logs):
    exposure = Exposure()
    environ = secret_env | bad
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    exposure.add_error("load_settings", raised.value)
    assert any(name in str(raised.value) for name in bad), str(raised.value)

    for name, value in bad.items():  # the same through a function, as the Functions host runs it
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as from_function:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    exposure.add_error("timer main", from_function.value)
    exposure.add_logs("timer main", debug_logs)

    result = run_cli_verbose(cli_environment(environ), "check", "--dry-run")  # and through the CLI
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: " in result.stderr
    exposure.add("CLI stdout", result.stdout)
    exposure.add("CLI stderr", result.stderr)
    exposure.assert_clean()


def test_valid_secret_settings_and_the_clients_built_from_them_never_show_a_secret(
    secret_env, monkeypatch, cosmos_container, event_tap, debug_logs
):
    """Service Bus with a canary SharedAccessKey (nothing listens there) next to RabbitMQ with a canary
    password: reprs, the publisher, and the failure to reach Service Bus, logged with its traceback."""
    exposure = Exposure()
    monkeypatch.setenv("ServiceBusConnection", SERVICE_BUS_CONNECTION)
    settings = load_settings(dict(os.environ))
    for view in (repr(settings), str(settings), settings.model_dump(), settings.model_dump_json(), vars(settings)):
        exposure.add("settings", view)
    publisher = publisher_from_settings(settings)
    exposure.add("publisher", publisher)
    for transport in publisher.transports:
        exposure.add(f"transport {transport.name}", transport)
        exposure.add(f"transport {transport.name} str", str(transport))
    publisher.close()

    runtime.reset()
    with pytest.raises(Exception, match="service-bus") as raised:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    exposure.add_error("timer with unreachable Service Bus", raised.value)
    assert len(event_tap.of_type(CHECK_EXPIRING)) == 1  # RabbitMQ (canary password) got it
    exposure.add_logs("timer", debug_logs)
    exposure.assert_clean()


def test_a_refused_broker_password_is_never_shown(secret_env, monkeypatch, cosmos_container, debug_logs):
    exposure = Exposure()
    wrong = secret_env["RABBITMQ_URL"].replace(BROKER_PASSWORD, f"{BROKER_PASSWORD}-wrong")
    monkeypatch.setenv("RABBITMQ_URL", wrong)
    with pytest.raises(Exception, match="rabbitmq") as raised:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    exposure.add_error("timer with a refused password", raised.value)
    exposure.add_logs("timer", debug_logs)
    result = run_cli_verbose(cli_environment(secret_env | {"RABBITMQ_URL": wrong}), "run", "--once", timeout=60)
    assert result.returncode != 0
    exposure.add("CLI stdout", result.stdout)
    exposure.add("CLI stderr", result.stderr)
    exposure.assert_clean()


# The CLI ------------------------------------------------------------------------------------------


def test_cli_dry_run_and_run_once_never_print_a_secret(secret_env, cosmos_container, manager, event_tap):
    seed(cosmos_container)
    with StandInManager() as elsewhere:
        manager.script = echoing_manager(elsewhere.url)
        env = cli_environment(secret_env)
        dry = run_cli_verbose(env, "check", "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        once = run_cli_verbose(env, "run", "--once", "--queue-prefix", f"secrets-cli-{uuid.uuid4().hex[:8]}.")
        assert once.returncode == 0, once.stderr[-3000:]
        assert elsewhere.sockets_accepted == 0
    assert f"{len(GOOD) + len(FAILING) + 1} connection(s) would be refreshed" in dry.stdout
    assert f"refreshed {len(GOOD)}, failed {len(FAILING) + 1}" in once.stdout
    assert {call.connection_id for call in manager.calls} == set(GOOD) | set(FAILING)
    exposure = Exposure()
    for name, result in (("check --dry-run", dry), ("run --once", once)):
        exposure.add(f"{name} stdout", result.stdout)
        exposure.add(f"{name} stderr", result.stderr)
    for captured_properties, body in raw_messages(event_tap.channel, event_tap.queue):
        exposure.add("exchange", captured_properties)
        exposure.add("exchange", body.decode("utf-8", "replace"))
    exposure.assert_clean()


# Every form of a secret (issue 11) ----------------------------------------------------------------

# Characters that repr(), percent-encoding and JSON each write differently, around the canary.
ODD_MANAGER_TOKEN = f"im-{CANARY}\\'\"/+=&%:@"
ODD_COSMOS_KEY = base64.b64encode(b"\xfb\xff" + f"ck-{CANARY}".encode()).decode()  # "+/...==": base64's odd ones
ODD_SERVICE_BUS_KEY = f"sb+/{CANARY}="
ODD_BROKER_PASSWORD = f"pw/{CANARY}@:%'\"\\"


def every_form(secret: str) -> dict[str, str]:
    """The forms a secret takes in texts: raw, repr-escaped (once; twice, in the repr of an exception
    that quotes it), percent-encoded, JSON-escaped, in a repr'd Authorization header."""
    return {
        "raw": secret,
        "repr": repr(secret)[1:-1],
        "repr of a repr": repr(repr(secret))[1:-1],
        "ascii": ascii(secret)[1:-1],
        "bytes repr": repr(secret.encode())[2:-1],
        "url-encoded": quote(secret, safe=""),
        "url-encoded, lower-case hex": quote(secret, safe="").lower(),
        "url-encoded path": quote(secret),
        "form-encoded": quote_plus(secret),
        "json": json.dumps(secret)[1:-1],
        "json in json": json.dumps(json.dumps(secret))[1:-1],
        "bearer header repr": repr(f"Bearer {secret}"),
    }


def leak(secrets: list[str]) -> str:
    """A text carrying each secret raw, repr-escaped and URL-encoded (what a careless error message does)."""
    return " | ".join(f"{s} {s!r} {quote(s, safe='')} {json.dumps(s)}" for s in secrets)


def odd_secrets_exposure() -> Exposure:
    forms = {form for secret in (ODD_MANAGER_TOKEN, ODD_COSMOS_KEY) for form in every_form(secret).values()}
    return Exposure((*SECRETS, ODD_COSMOS_KEY[:16], *sorted(forms)))


@pytest.mark.parametrize(
    ("setting", "value", "secret"),
    [
        ("INTEGRATION_MANAGER_TOKEN", ODD_MANAGER_TOKEN, ODD_MANAGER_TOKEN),
        ("COSMOS_KEY", ODD_COSMOS_KEY, ODD_COSMOS_KEY),
        ("RABBITMQ_URL", f"amqp://app:{quote(ODD_BROKER_PASSWORD, safe='')}@rabbit:5672/", ODD_BROKER_PASSWORD),
        (
            "ServiceBusConnection",
            f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={ODD_SERVICE_BUS_KEY}",
            ODD_SERVICE_BUS_KEY,
        ),
    ],
)
@pytest.mark.parametrize("form", list(every_form("x")))
def test_the_scrubber_masks_every_form_of_every_secret_setting(setting, value, secret, form):
    scrub = Scrubber(load_settings({setting: value}))
    leaked = every_form(secret)[form]
    scrubbed = scrub(f"before {leaked} after", 10_000)
    assert "***" in scrubbed
    assert scrubbed.startswith("before ") and scrubbed.endswith(" after")
    assert CANARY not in scrubbed and leaked not in scrubbed and (form != "raw" or scrubbed == "before *** after")


def test_a_header_value_requests_refuses_never_carries_the_token_into_the_error(manager):
    """Behind the settings check: requests' InvalidHeader quotes the whole `Bearer <token>` header, and
    came out of refresh_connection into every delivery's error line and dead-letter reason."""
    exposure = Exposure()
    client = IntegrationManagerClient(manager.url, f"{MANAGER_TOKEN[:20]}\n{MANAGER_TOKEN[20:]}")
    with pytest.raises(Exception) as raised:
        client.refresh_connection("slack", "c-1", "t-secret", idempotency_key="k-1")
    exposure.add_error("refresh_connection", raised.value)
    exposure.assert_clean()
    assert "could not build the refresh request (InvalidHeader)" in str(raised.value)
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    assert manager.calls == []


def test_log_lines_are_scrubbed_once_the_app_has_read_its_settings(secret_env, monkeypatch, debug_logs):
    """As in Azure: runtime.settings() puts the scrubbing filter on the root logger's handlers, which
    see every record, a child logger's and a library's included."""
    monkeypatch.setenv("INTEGRATION_MANAGER_TOKEN", ODD_MANAGER_TOKEN)
    monkeypatch.setenv("COSMOS_KEY", ODD_COSMOS_KEY)
    runtime.reset()
    runtime.settings()
    secrets = [ODD_MANAGER_TOKEN, ODD_COSMOS_KEY, BROKER_PASSWORD]
    for name in ("shared.token_refresh", "azure.core.pipeline", "pika.adapters"):
        logging.getLogger(name).error("leaked: %s %r", leak(secrets), secrets)
    try:
        raise ValueError(leak(secrets))
    except ValueError:
        logging.getLogger("shared.local_host").exception("with a traceback")
    # Every record arrived (a library's possibly twice: pytest's capture may also sit on its logger).
    assert all(f"{name}:" in debug_logs.text for name in ("token_refresh", "azure.core.pipeline", "pika.adapters"))
    assert debug_logs.text.count("leaked: ") >= 3 and "ValueError: " in debug_logs.text
    exposure = odd_secrets_exposure()
    exposure.add_logs("app", debug_logs)
    exposure.assert_clean()


LEAKY_FUNCTION = """
import json
import logging
from urllib.parse import quote, urlsplit

from shared import runtime


def main(message, context):
    settings = runtime.settings()
    secrets = [
        settings.integration_manager_token.get_secret_value(),
        settings.cosmos_key.get_secret_value(),
        urlsplit(settings.rabbitmq_url.get_secret_value()).password,
    ]
    forms = " | ".join(f"{s} {s!r} {quote(s, safe='')} {json.dumps(s)}" for s in secrets)
    try:
        raise ValueError(f"inner: {forms}")
    except ValueError:
        logging.getLogger("leaky.child").exception("raw, repr-escaped and URL-encoded: %s %r", forms, secrets)
    raise RuntimeError(f"failed with {forms} {secrets!r}")
"""


def leaky_app(root: Path) -> str:
    """A function app whose refresh-requested function logs and raises with every secret in every
    form; returns the function's name."""
    suffix = uuid.uuid4().hex[:8]
    timer, leaky = root / f"idle_timer_{suffix}", root / f"leaky_refresh_{suffix}"
    timer.mkdir()
    (timer / "function.json").write_text(
        json.dumps(
            {"bindings": [{"name": "timer", "type": "timerTrigger", "direction": "in", "schedule": "0 0 * * * *"}]}
        )
    )
    (timer / "__init__.py").write_text("def main(timer, context):\n    pass\n")
    leaky.mkdir()
    (leaky / "function.json").write_text(
        json.dumps({"bindings": [{"name": "message", "type": "serviceBusTrigger", "direction": "in",
                                  "queueName": REFRESH_REQUESTED, "connection": "ServiceBusConnection"}]})
    )  # fmt: skip
    (leaky / "__init__.py").write_text(LEAKY_FUNCTION)
    return leaky.name


def test_no_form_of_a_secret_survives_in_the_local_hosts_logs_dead_letters_or_the_dead_letters_command(
    secret_env, monkeypatch, rabbitmq, tmp_path, debug_logs
):
    """A function fails with every secret in its error, raw, repr-escaped and URL-encoded: the local host
    logs that error and dead-letters the message with it as the reason; an older dead letter carries the
    same forms. Nothing of them may reach the captured logs, the dead-letter headers read back from
    RabbitMQ, or `dead-letters` output."""
    monkeypatch.setenv("INTEGRATION_MANAGER_TOKEN", ODD_MANAGER_TOKEN)
    monkeypatch.setenv("COSMOS_KEY", ODD_COSMOS_KEY)
    monkeypatch.syspath_prepend(str(tmp_path))
    runtime.reset()
    function_name = leaky_app(tmp_path)
    prefix = f"secret-forms-{uuid.uuid4().hex[:8]}."
    host = LocalHost(load_settings(), queue_prefix=prefix, app_root=tmp_path)
    channel = host.connect()
    [function] = host.functions
    channel.confirm_delivery()
    channel.basic_publish(
        secret_env["RABBITMQ_EXCHANGE"],
        REFRESH_REQUESTED,
        json.dumps(raw_event(REFRESH_REQUESTED, {"connectionId": "c-1"})).encode(),
        pika.BasicProperties(message_id="leaky-1"),
    )
    summary = host.run_once()
    assert summary.dead_lettered == 1
    secrets = [ODD_MANAGER_TOKEN, ODD_COSMOS_KEY, BROKER_PASSWORD]
    channel.basic_publish(  # as an older host wrote it: the reason unscrubbed
        "",
        function.dead_letter_queue,
        b"{}",
        pika.BasicProperties(
            message_id="planted-1",
            headers={
                "x-dead-letter-reason": "MaxDeliveryCountExceeded",
                "x-dead-letter-error-description": leak(secrets),
            },
        ),
    )

    env = cli_environment(secret_env | {"INTEGRATION_MANAGER_TOKEN": ODD_MANAGER_TOKEN, "COSMOS_KEY": ODD_COSMOS_KEY})
    listed = run_cli(env, "dead-letters", "--transport", "rabbitmq", "--queue", "refresh-requested",
                     "--queue-prefix", prefix, timeout=60)  # fmt: skip
    dead_letters = raw_messages(channel, function.dead_letter_queue)
    host.close()

    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "leaky-1" in listed.stdout and "planted-1" in listed.stdout
    assert f"Function {function_name} failed on message leaky-1 (delivery 3 of 3)" in debug_logs.text
    assert "raw, repr-escaped and URL-encoded" in debug_logs.text
    exposure = odd_secrets_exposure()
    exposure.add_logs("local host", debug_logs)
    assert sorted(p.message_id for p, _ in dead_letters) == ["leaky-1", "planted-1"]
    for dead_properties, _ in dead_letters:
        if dead_properties.message_id == "leaky-1":
            assert "RuntimeError: failed with ***" in dead_properties.headers["x-dead-letter-error-description"]
            exposure.add("dead-letter headers", dead_properties.headers)
    exposure.add("dead-letters stdout", listed.stdout)
    exposure.add("dead-letters stderr", listed.stderr)
    exposure.assert_clean()


# TLS verification ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and 127.0.0.2: (server SSL context, certificate file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in integration-manager")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(h)) for h in ("127.0.0.1", "127.0.0.2")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def test_the_manager_client_verifies_tls_certificates(self_signed, app_env, monkeypatch, cosmos_container, event_tap):
    context, cert_file = self_signed
    with StandInManager(ssl_context=context) as untrusted:
        monkeypatch.setenv("INTEGRATION_MANAGER_URL", untrusted.url)
        cosmos_container.upsert_item(connection("tls-1", tenantId="t-secret"))
        # Last delivery (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3), so the failure is reported, not retried.
        invoke(sync_refresh_handler, trigger(refresh_requested(cosmos_container, "tls-1"), delivery_count=3))
        [event] = event_tap.of_type(REFRESH_FAILED)
        error = event["data"]["error"]
        assert (error["code"], event["data"]["retryable"]) == ("network_error", True)
        assert "SSLError" in error["message"]
        assert untrusted.calls == [] and untrusted.sockets_accepted == 0  # no request, so no token, was sent

        # Control: the same server is fine for a client told to trust its certificate.
        session = requests.Session()
        session.verify = str(cert_file)
        trusting = IntegrationManagerClient(untrusted.url, "t0ken", session=session)
        assert trusting.refresh_connection("slack", "tls-1", "t-secret").succeeded
        assert len(untrusted.calls) == 1


def test_the_manager_session_is_never_told_to_skip_verification(app_env):
    client = runtime.manager_client()
    assert client._session.verify is True  # not False, and not a custom bundle
    assert client._session.trust_env is False  # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE cannot turn it off


@pytest.mark.parametrize(
    ("endpoint", "emulator", "error"),
    [
        ("https://127.0.0.1:8081/", "", "set COSMOS_EMULATOR=true"),
        ("https://localhost:8081/", "false", "set COSMOS_EMULATOR=true"),
        ("https://LOCALHOST:8081/", "0", "set COSMOS_EMULATOR=true"),
        ("https://acct.documents.azure.com:443/", "true", "only allowed with a loopback COSMOS_ENDPOINT"),
        ("https://127.0.0.1.nip.io:8081/", "true", "only allowed with a loopback COSMOS_ENDPOINT"),
        ("https://localhost.example.com/", "true", "only allowed with a loopback COSMOS_ENDPOINT"),
        ("https://127.0.0.1:8081/", "true", None),
        ("https://acct.documents.azure.com:443/", "false", None),
    ],
)
def test_cosmos_tls_verification_is_off_only_for_an_explicit_loopback_emulator(
    endpoint, emulator, error, app_env, monkeypatch, event_tap
):
    monkeypatch.setenv("COSMOS_ENDPOINT", endpoint)
    monkeypatch.setenv("COSMOS_EMULATOR", emulator)
    if error is None:
        load_settings()
        return
    with pytest.raises(SettingsError, match=error):
        load_settings()
    with pytest.raises(SettingsError, match=error):  # the function refuses to start with it
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    assert event_tap.drain() == []


def test_a_non_emulator_cosmos_endpoint_is_verified(self_signed, app_env, monkeypatch, event_tap):
    """127.0.0.2 is loopback, but not one of the hosts for which the Cosmos SDK skips verification: with
    COSMOS_EMULATOR unset, a self-signed certificate there is refused."""
    context, _ = self_signed
    with StandInManager(ssl_context=context, host="127.0.0.2") as untrusted:
        monkeypatch.setenv("COSMOS_ENDPOINT", untrusted.url + "/")
        monkeypatch.setenv("COSMOS_EMULATOR", "false")
        load_settings()  # accepted: a non-emulator endpoint
        now = utc_now()
        check = make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)))
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            invoke(manager_check_handler, trigger(check.to_json()))
        assert untrusted.calls == [] and untrusted.sockets_accepted == 0
    assert event_tap.of_type(REFRESH_REQUESTED) == []
