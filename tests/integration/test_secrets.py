"""No secret ever leaves the app, and TLS verification stays on (issue 3, item 6).

Canary test: every secret the app handles holds a unique canary string (token values in Cosmos
documents, INTEGRATION_MANAGER_TOKEN, the RabbitMQ password, COSMOS_KEY, the Service Bus
SharedAccessKey; tests/support/canaries.py). Failures are then driven at every stage in process (poison
messages, bad documents, integration-manager 4xx/5xx/timeouts/redirects/dropped connections whose bodies
echo the canaries) and everything the app emits is captured: log records at DEBUG (SDK loggers included)
with their tracebacks, exception texts and reprs, every message on the RabbitMQ exchange, dead-lettered
messages' headers. No canary may appear in any of it. The same through the CLI and the local host as a
program: tests/e2e/test_secrets.py; the scrubber on its own: tests/unit/test_secrets.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
import requests
from azure.functions.timer import TimerRequest

import check_expiring_timer
import manager_check_handler
import sync_refresh_handler
from localdev.local_host import LocalHost
from localdev.stand_in_manager import Answer, StandInManager
from shared import runtime
from shared.errors import InvalidEventError, RefreshRetryLaterError, SettingsError
from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESH_REQUESTED, CheckExpiringData, make_event
from shared.manager_client import IntegrationManagerClient
from shared.messaging import publisher_from_settings
from shared.settings import load_settings
from shared.times import utc_now
from tests.support.canaries import (
    ACCESS_TOKEN,
    BROKER_PASSWORD,
    FAILING,
    GOOD,
    MANAGER_TOKEN,
    ODD_COSMOS_KEY,
    ODD_MANAGER_TOKEN,
    REFRESH_TOKEN,
    SERVICE_BUS_CONNECTION,
    UNUSABLE,
    Exposure,
    connection,
    echoing_manager,
    leak,
    odd_secrets_exposure,
    raw_messages,
    seed_secret_connections,
)
from tests.support.helpers import invoke, iso, raw_event, refresh_request, trigger


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


# The whole pipeline, in process -------------------------------------------------------------------


def test_no_canary_in_logs_events_errors_or_dead_letters(
    secret_env, rabbitmq, cosmos_container, manager, event_tap, debug_logs
):
    exposure = Exposure()
    seed_secret_connections(cosmos_container)
    manager.container = cosmos_container  # a 2xx refreshes the document, as the real manager does
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
    with pytest.raises(RefreshRetryLaterError) as retry_error:
        invoke(sync_refresh_handler, trigger(refresh_requested(cosmos_container, "down-again")))
    exposure.add_error("RefreshRetryLaterError", retry_error.value)

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


# Every form of a secret (issue 11) ----------------------------------------------------------------


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
        logging.getLogger("localdev.local_host").exception("with a traceback")
    # Every record arrived (a library's possibly twice: pytest's capture may also sit on its logger).
    assert all(f"{name}:" in debug_logs.text for name in ("token_refresh", "azure.core.pipeline", "pika.adapters"))
    assert debug_logs.text.count("leaked: ") >= 3 and "ValueError: " in debug_logs.text
    exposure = odd_secrets_exposure()
    exposure.add_logs("app", debug_logs)
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
