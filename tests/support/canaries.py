"""Secrets with a canary in them, and what the app let out (the secrets tests of every layer).

Every secret the app handles holds a unique canary string (token values in Cosmos documents,
INTEGRATION_MANAGER_TOKEN, the RabbitMQ password, COSMOS_KEY, the Service Bus SharedAccessKey);
finding the canary anywhere (even cut short) is a leak. ``Exposure`` collects everything the app
emitted and asserts that none of it holds a secret.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import traceback
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from localdev.stand_in_manager import Answer
from shared import runtime
from shared.times import utc_now
from tests.support.helpers import iso

# In every secret below: finding it anywhere (even cut short) is a leak. New each run; under pytest-xdist, the
# run's id that every worker shares, since test ids carry it and the workers must collect the same tests.
CANARY = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
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
SDK_LOGGERS = ("azure", "pika", "urllib3", "requests", "shared", "localdev")


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
        # After a call that may still be in flight (the "slow" answer comes 1.0 s after the call, "dropped"), no new
        # call for 1 s instead of app_env's 2 s: still past the slow answer, and 3 deliveries x 2 connections sooner.
        "INTEGRATION_MANAGER_IN_FLIGHT_MS": "1000",
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
            "slow": Answer(200, echo, delay_s=1.0, keep_document=True),
            "dropped": Answer(drop_connection=True, keep_document=True),
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


def seed_secret_connections(container) -> None:
    """GOOD, FAILING, a dot-only id, a revoked and the UNUSABLE connections, canaries in every token."""
    for connection_id in (*GOOD, *FAILING, ".."):
        container.upsert_item(connection(connection_id))
    container.upsert_item(connection("revoked", status="revoked"))
    for document in UNUSABLE:
        container.upsert_item(document)


def raw_messages(channel, queue: str) -> list[tuple[Any, bytes]]:
    messages = []
    while (delivery := channel.basic_get(queue, auto_ack=True))[0] is not None:
        messages.append((delivery[1], delivery[2]))
    return messages


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
