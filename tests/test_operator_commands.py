"""Operator commands of `python -m shared.cli`: `trigger`, `refresh`, `dead-letters`.

RabbitMQ and Cosmos paths run against the real local services (the commands in-process through
`shared.cli.main`, the local host as a subprocess, as in test_end_to_end.py). The Service Bus
dead-letter path runs at the SDK boundary: dead letters are the SDK's own ServiceBusReceivedMessage,
decoded from the AMQP bytes a broker would deliver, and the receiver/sender are recording fakes."""

import json
import os
import re
import socket
import uuid
from datetime import UTC, datetime, timedelta

import pika
import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus._pyamqp._encode import encode_payload
from azure.servicebus._pyamqp.message import Header
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport
from azure.servicebus.exceptions import ServiceBusConnectionError

from shared import operator_commands, runtime
from shared.cli import main
from shared.connection_store import ExpiringConnection
from shared.events import (
    CHECK_EXPIRING,
    CONTENT_TYPE,
    REFRESH_REQUESTED,
    CheckExpiringData,
    RefreshedData,
    RefreshRequestedData,
    make_event,
    parse_event,
    parse_time,
    utc_now,
)
from shared.expiring_check import refresh_requested_event, request_refresh_for_expiring_connections
from shared.local_host import LocalHost
from shared.messaging import ServiceBusTransport, publisher_from_settings
from shared.operator_commands import Scrubber
from shared.settings import load_settings
from tests.conftest import MANAGER_TOKEN
from tests.helpers import cli_environment, iso
from tests.test_end_to_end import APP_ROOT, run_cli
from tests.test_messaging_servicebus import CONNECTION_STRING, RecordingClient
from tools.stand_in_manager import Answer

SHARED_ACCESS_KEY = "bm90LWEtcmVhbC1rZXk="  # the key inside CONNECTION_STRING


@pytest.fixture
def host_env(app_env):
    """The environment of a `python -m shared.cli run` subprocess (the local host), as in test_end_to_end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_REFRESH", "COSMOS", "RABBITMQ"))}
    env.update(app_env)
    env.update({"ServiceBusConnection": "", "ServiceBusConnection__fullyQualifiedNamespace": ""})
    env["PYTHONPATH"] = str(APP_ROOT)
    return env


@pytest.fixture
def operator_env(app_env, monkeypatch, tmp_path):
    """app_env for in-process `main()`: no developer local.settings.json, no Service Bus."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("shared.cli.APP_ROOT", tmp_path)
    monkeypatch.setenv("ServiceBusConnection", "")
    monkeypatch.setenv("ServiceBusConnection__fullyQualifiedNamespace", "")
    return app_env


def seed(container, connection_id, *, tenant="t-1", integration="salesforce", status="active", expires_in_h=48.0):
    document = {
        "id": connection_id,
        "tenantId": tenant,
        "integrationId": integration,
        "status": status,
        "oauth": {
            "accessToken": "at-secret",
            "refreshToken": "rt-secret",
            "expiresAt": iso(datetime.now(UTC) + timedelta(hours=expires_in_h)),
        },
    }
    return container.upsert_item(document)


def outputs(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


# trigger ---------------------------------------------------------------------------------------------


def test_trigger_publishes_one_check_expiring_like_the_timer(operator_env, event_tap, capsys):
    before = utc_now()
    assert main(["trigger"]) == 0
    out, _ = outputs(capsys)

    [captured] = event_tap.drain()
    assert captured.routing_key == CHECK_EXPIRING
    envelope, check = parse_event(json.dumps(captured.body), CHECK_EXPIRING)
    assert captured.properties.message_id == envelope.id
    assert captured.properties.content_type == CONTENT_TYPE
    assert set(captured.body["data"]) == {"timestamp", "thresholdTime"}
    assert before <= check.timestamp <= utc_now()
    assert check.threshold_time - check.timestamp == timedelta(milliseconds=3_900_000)
    assert f"eventId={envelope.id}" in out
    assert f"thresholdTime={captured.body['data']['thresholdTime']}" in out
    assert f"RabbitMQ exchange '{operator_env['RABBITMQ_EXCHANGE']}'" in out


def test_trigger_refuses_when_switched_off_unless_forced(operator_env, monkeypatch, event_tap, capsys):
    monkeypatch.setenv("TOKEN_REFRESH_ENABLED", "false")
    assert main(["trigger"]) == 1
    _, err = outputs(capsys)
    assert "TOKEN_REFRESH_ENABLED=false" in err
    assert "--force" in err
    assert event_tap.drain() == []

    assert main(["trigger", "--force"]) == 0
    out, _ = outputs(capsys)
    assert "published anyway (--force)" in out
    assert [event.routing_key for event in event_tap.drain()] == [CHECK_EXPIRING]


def test_trigger_and_refresh_fail_loudly_when_no_queue_would_receive_the_event(
    operator_env, cosmos_container, rabbitmq, capsys
):
    """Without Service Bus, RabbitMQ drives the functions. Before the local host declared its queues,
    nothing would receive the event and the broker would drop it: the commands publish it mandatory."""
    exchange = operator_env["RABBITMQ_EXCHANGE"]
    seed(cosmos_container, "conn-1")
    commands = {CHECK_EXPIRING: ["trigger"], REFRESH_REQUESTED: ["refresh", "salesforce", "conn-1"]}
    for event_type, argv in commands.items():
        assert main(argv) == 1
        out, err = outputs(capsys)
        assert out == ""
        assert f"no queue is bound to exchange '{exchange}' for routing key {event_type}" in err
        assert "start the local host first (`python -m shared.cli run`)" in err

    # The app's own publishes are not mandatory: the platform may have no consumer of an outcome.
    publisher = publisher_from_settings(load_settings())
    now = utc_now()
    outcome = RefreshedData(connection_id="conn-1", integration_id="salesforce", tenant_id="t-1", refreshed_at=now)
    try:
        assert publisher.publish([make_event(outcome)]) == 1
    finally:
        publisher.close()

    # Once the local host has declared its queues, the same commands publish to them.
    host = LocalHost(load_settings(), queue_prefix=f"ops-{uuid.uuid4().hex[:8]}.")
    channel = host.connect()
    try:
        for event_type, argv in commands.items():
            assert main(argv) == 0
            assert f"{event_type} eventId=" in outputs(capsys)[0]
            [queue] = [f.queue for f in host.functions if f.event_type == event_type]
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            assert method is not None and properties.type == event_type
    finally:
        host.close()


def test_trigger_with_service_bus_does_not_need_a_rabbitmq_consumer(operator_env, monkeypatch, capsys):
    """With Service Bus, the functions are triggered by its queues and RabbitMQ is only the bridge to
    the platform, which may not listen for a check: the RabbitMQ publish is not mandatory then."""
    client = RecordingClient()
    monkeypatch.setenv("ServiceBusConnection", CONNECTION_STRING)
    monkeypatch.setattr(ServiceBusTransport, "from_settings", classmethod(lambda cls, settings: cls(client)))
    assert main(["trigger"]) == 0
    assert "RabbitMQ exchange" in outputs(capsys)[0]
    assert len(client.senders[CHECK_EXPIRING].sent_batches) == 1


def test_trigger_without_any_transport_is_a_settings_error(operator_env, monkeypatch, capsys):
    monkeypatch.delenv("RABBITMQ_URL")
    assert main(["trigger"]) == 2
    assert "No event transport is configured" in outputs(capsys)[1]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("verbose", [False, True])
def test_trigger_with_the_broker_unreachable_prints_one_error_line_without_secrets(verbose):
    port = closed_port()
    env = cli_environment(
        {
            "RABBITMQ_URL": f"amqp://ops:s3cret-pass@127.0.0.1:{port}/",
            "RABBITMQ_EXCHANGE": "unreachable.events",
            "TOKEN_REFRESH_INTERVAL_MS": "3600000",
            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3900000",
        }
    )
    result = run_cli(env, *(["-v"] if verbose else []), "trigger", timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "s3cret-pass" not in result.stdout + result.stderr
    # What failed, where (host:port, not the URL) and what to check.
    error = (
        re.escape("error: could not publish integration.token.check-expiring (eventId ")
        + "[0-9a-f-]{36}"
        + re.escape(
            f"): rabbitmq: AMQPConnectionError at 127.0.0.1:{port} (Connection refused); "
            "check that RabbitMQ is running there and that RABBITMQ_URL is right"
        )
    )
    lines = result.stderr.splitlines()
    if not verbose:
        # pika's own ~20 ERROR lines and tracebacks are DEBUG records: not shown.
        assert len(lines) == 1, result.stderr
        assert re.fullmatch(error, lines[0]), lines[0]
        return
    # -v: the same records, as DEBUG; the command's error line is still the one error.
    assert re.fullmatch(error, lines[-1]), lines[-1]
    assert any(" DEBUG pika." in line and "Connection refused" in line for line in lines)
    assert not re.search(r" (ERROR|WARNING|CRITICAL) (pika|azure|urllib3)", result.stderr)
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]


# refresh ---------------------------------------------------------------------------------------------


def test_refresh_publishes_the_checks_own_request_for_the_connection(operator_env, cosmos_container, event_tap, capsys):
    document = seed(cosmos_container, "conn-1", expires_in_h=0.5)  # due: the check below requests it too
    seed(cosmos_container, "conn-1", tenant="t-2", integration="google")  # same id, another integration

    assert main(["refresh", "salesforce", "conn-1"]) == 0
    out, _ = outputs(capsys)

    [captured] = event_tap.drain()
    assert captured.routing_key == REFRESH_REQUESTED
    envelope, request = parse_event(json.dumps(captured.body), REFRESH_REQUESTED)
    expected = refresh_requested_event(
        ExpiringConnection(
            connection_id="conn-1",
            integration_id="salesforce",
            tenant_id="t-1",
            status="active",
            expires_at=parse_time(document["oauth"]["expiresAt"]),
            document_ts=document["_ts"],
        ),
        request.requested_at,
    )
    assert captured.body == json.loads(expected.to_json())
    assert captured.properties.message_id == envelope.id == expected.id
    assert f"eventId={expected.id}" in out
    assert "tenantId='t-1'" in out

    # The check publishes the very same request (same deterministic id) when the connection is due.
    now = utc_now()
    request_refresh_for_expiring_connections(
        CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)),
        store=runtime.connection_store(),
        states=runtime.state_store(),
        publisher=runtime.publisher(),
        settings=runtime.settings(),
    )
    requested = {(e.body["data"]["tenantId"], e.body["data"]["connectionId"]): e.body["id"] for e in event_tap.drain()}
    assert requested[("t-1", "conn-1")] == expected.id


def test_refresh_refuses_unknown_foreign_and_unrefreshable_connections(
    operator_env, cosmos_container, event_tap, capsys
):
    seed(cosmos_container, "conn-1")
    seed(cosmos_container, "conn-revoked", status="revoked")
    seed(cosmos_container, "conn-disabled", status="Disabled")
    cosmos_container.upsert_item({"id": "conn-plain", "tenantId": "t-1", "integrationId": "salesforce"})

    cases = {
        ("salesforce", "nope"): "No connection with id 'nope'",
        ("google", "conn-1"): "does not belong to integration 'google'; it belongs to 'salesforce' (tenant 't-1')",
        ("salesforce", "conn-revoked"): "is 'revoked' (in TOKEN_REFRESH_SKIP_STATUSES): not requesting a refresh",
        ("salesforce", "conn-disabled"): "is 'Disabled' (in TOKEN_REFRESH_SKIP_STATUSES): not",
        ("salesforce", "conn-plain"): "has no oauth object",
    }
    for (integration, connection), message in cases.items():
        assert main(["refresh", integration, connection]) == 1, connection
        assert message in outputs(capsys)[1]
    assert main(["refresh", "salesforce", "conn-1", "--tenant", "t-9"]) == 1
    assert "No connection with id 'conn-1' in tenant 't-9'" in outputs(capsys)[1]
    assert event_tap.drain() == []

    # --force publishes the request, and says the handler will still skip it.
    assert main(["refresh", "salesforce", "conn-revoked", "--force"]) == 0
    out, _ = outputs(capsys)
    assert "published anyway (--force)" in out
    assert "skips it while its status is 'revoked'" in out
    assert [e.body["data"]["connectionId"] for e in event_tap.drain()] == ["conn-revoked"]


def test_refresh_says_when_its_request_already_ended(host_env, operator_env, cosmos_container, manager, capsys):
    seed(cosmos_container, "conn-x")
    manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    assert run_cli(host_env, "run", "--once", "--queue-prefix", prefix).returncode == 0
    assert main(["refresh", "salesforce", "conn-x"]) == 0
    first, _ = outputs(capsys)
    assert "note:" not in first
    result = run_cli(host_env, "run", "--once", "--queue-prefix", prefix)
    assert "failed 1" in result.stdout
    assert "invalid_grant" in result.stdout

    # Same connection, same expiresAt: same request id, which ended with a permanent failure.
    assert main(["refresh", "salesforce", "conn-x"]) == 0
    again, _ = outputs(capsys)
    assert re.findall(r"eventId=(\S+)", again) == re.findall(r"eventId=(\S+)", first)
    assert "note: this request id already ended (failed); sync_refresh_handler will not call" in again
    result = run_cli(host_env, "run", "--once", "--queue-prefix", prefix)
    assert "refreshed 0, failed 0" in result.stdout
    assert "this request was already handled" in result.stderr
    assert len(manager.calls) == 1  # integration-manager was not called again


def test_refresh_with_cosmos_misconfigured_fails_clearly(operator_env, monkeypatch, event_tap, capsys):
    monkeypatch.setenv("COSMOS_CONNECTIONS_CONTAINER", "no_such_container")
    assert main(["refresh", "salesforce", "conn-1"]) == 1
    err = outputs(capsys)[1]
    assert "error: could not read the connection from Cosmos: CosmosResourceNotFoundError" in err
    assert operator_env["COSMOS_KEY"] not in err
    assert event_tap.drain() == []


def test_refresh_needs_the_tenant_when_several_tenants_have_the_connection(
    operator_env, cosmos_container, event_tap, capsys
):
    seed(cosmos_container, "conn-1", tenant="t-1")
    seed(cosmos_container, "conn-1", tenant="t-2")
    with pytest.raises(SystemExit) as raised:
        main(["refresh", "salesforce", "conn-1"])
    assert raised.value.code == 2
    err = outputs(capsys)[1]
    assert "exists in 2 tenants ('t-1', 't-2'); pass --tenant TENANT_ID" in err
    assert "usage: python -m shared.cli refresh" in err
    assert event_tap.drain() == []

    assert main(["refresh", "salesforce", "conn-1", "--tenant", "t-2"]) == 0
    [captured] = event_tap.drain()
    assert captured.body["data"]["tenantId"] == "t-2"


# dead letters on the local host's RabbitMQ ---------------------------------------------------------------


def dead_letter_queue_depth(url: str, queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def test_dead_letters_lists_poison_messages_without_consuming_then_replays_one(
    host_env, operator_env, rabbitmq, exchange, manager, capsys
):
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    # One worker: the order of its log lines is the order it dead-letters in.
    run = ("run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3", "--workers", "1")
    assert run_cli(host_env, *run).returncode == 0  # declares the local host's queues
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        channel.basic_publish(
            exchange, REFRESH_REQUESTED, b'{"specversion": "1.0", "oops": true}', pika.BasicProperties(message_id="p-1")
        )
        half_event = json.dumps({"specversion": "1.0", "type": REFRESH_REQUESTED, "data": {"connectionId": "conn-7"}})
        channel.basic_publish(
            exchange,
            REFRESH_REQUESTED,
            half_event.encode(),
            pika.BasicProperties(message_id="p-2", type=REFRESH_REQUESTED, content_type=CONTENT_TYPE),
        )
    result = run_cli(host_env, *run)
    assert "dead-lettered 2" in result.stdout, result.stderr[-2000:]
    # The order the local host dead-lettered them in = the dead-letter queue's order.
    oldest, newest = re.findall(r"failed on message (p-\d) \(delivery 3 of 3\).*; dead-lettering", result.stderr)
    dead_letter_queue = prefix + "refresh-requested.dead-letter"

    listing = ["dead-letters", "--queue-prefix", prefix]
    assert main(listing) == 0
    first, _ = outputs(capsys)
    assert main(listing) == 0
    second, _ = outputs(capsys)
    assert first == second  # listing leaves the queue as it was, order included
    assert dead_letter_queue_depth(rabbitmq.url, dead_letter_queue) == 2
    assert f"refresh-requested: 2 dead letter(s) in '{dead_letter_queue}'" in first
    assert f"check-expiring: no dead letters in '{prefix}check-expiring.dead-letter'" in first
    assert re.findall(r"messageId=(\S+)", first) == [oldest, newest]
    lines = first.splitlines()
    [one] = [n for n, line in enumerate(lines) if "messageId=p-1 " in line]
    [two] = [n for n, line in enumerate(lines) if "messageId=p-2 " in line]
    assert "type=-  connectionId=-  deliveries=3" in lines[one]
    assert f"type={REFRESH_REQUESTED}  connectionId=conn-7  deliveries=3" in lines[two]
    assert lines[one + 1].startswith(
        "     reason: MaxDeliveryCountExceeded — InvalidEventError: not a CloudEvents 1.0 envelope"
    )

    assert main([*listing, "--limit", "1"]) == 0
    out, _ = outputs(capsys)
    assert "2 dead letter(s), showing the first 1" in out
    assert re.findall(r"messageId=(\S+)", out) == [oldest]

    # Replay the oldest one: back on its queue as it was published, minus the dead-letter headers.
    assert main([*listing, "--queue", "refresh-requested", "--replay", "--limit", "1"]) == 0
    out, _ = outputs(capsys)
    assert f"replaying from '{dead_letter_queue}' to '{prefix}refresh-requested'" in out
    assert re.findall(r"messageId=(\S+)", out) == [oldest]
    assert f"replayed 1 message(s) to '{prefix}refresh-requested'; 1 left in the dead-letter queue" in out
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        method, properties, body = channel.basic_get(prefix + "refresh-requested")
        published = {"p-1": b'{"specversion": "1.0", "oops": true}', "p-2": half_event.encode()}
        assert (properties.message_id, body) == (oldest, published[oldest])
        assert properties.type == (REFRESH_REQUESTED if oldest == "p-2" else None)
        assert not {name for name in properties.headers or {} if name.startswith("x-dead-letter")}
        assert "x-source-queue" not in (properties.headers or {})
        channel.basic_nack(method.delivery_tag, requeue=True)

    # The next run handles it with a fresh delivery count (the look above was delivery 1); it is still
    # poison, so it is dead-lettered again after its 3rd delivery.
    result = run_cli(host_env, *run)
    assert "dead-lettered 1" in result.stdout
    assert re.findall(r"failed on message (p-\d \(delivery \d of 3\))", result.stderr) == [
        f"{oldest} (delivery 2 of 3)",
        f"{oldest} (delivery 3 of 3)",
    ]
    assert main([*listing, "--queue", "refresh-requested"]) == 0
    assert re.findall(r"messageId=(\S+)", outputs(capsys)[0]) == [newest, oldest]
    assert manager.calls == []


def test_replayed_dead_letters_are_processed_once_the_cause_is_fixed(
    host_env, operator_env, cosmos_container, manager, rabbitmq, capsys
):
    """An outage (the connections container is missing) dead-letters a check and an operator's refresh
    request; after the fix, `dead-letters --replay` and one `run --once` get both processed."""
    seed(cosmos_container, "conn-ok", expires_in_h=48)  # not due: only the operator's request refreshes it
    manager.container = cosmos_container
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    run = ("run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3")
    assert run_cli(host_env, *run).returncode == 0
    assert main(["refresh", "salesforce", "conn-ok"]) == 0
    refresh_out, _ = outputs(capsys)
    [request_id] = re.findall(r"eventId=(\S+)", refresh_out)

    broken = host_env | {"COSMOS_CONNECTIONS_CONTAINER": f"missing_{uuid.uuid4().hex[:8]}"}
    result = run_cli(broken, *run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dead-lettered 2" in result.stdout
    assert manager.calls == []

    listing = ["dead-letters", "--queue-prefix", prefix]
    assert main(listing) == 0
    listed, _ = outputs(capsys)
    [check_id] = re.findall(rf"messageId=(\S+)  type={CHECK_EXPIRING}", listed)
    assert f"messageId={request_id}  type={REFRESH_REQUESTED}  connectionId=conn-ok  deliveries=3" in listed
    assert listed.count("CosmosResourceNotFoundError") == 2

    assert main([*listing, "--replay"]) == 0
    replayed, _ = outputs(capsys)
    assert f"check-expiring: replayed 1 message(s) to '{prefix}check-expiring'; 0 left" in replayed
    assert f"refresh-requested: replayed 1 message(s) to '{prefix}refresh-requested'; 0 left" in replayed

    result = run_cli(host_env, *run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [call.connection_id for call in manager.calls] == ["conn-ok"]
    assert f"(eventId={check_id})" in result.stderr  # the replayed check ran
    assert "dead-lettered 0" in result.stdout
    assert main(listing) == 0
    out, _ = outputs(capsys)
    assert out.count("no dead letters") == 2

    everything = refresh_out + listed + replayed + out + result.stdout + result.stderr
    for secret in (MANAGER_TOKEN, operator_env["COSMOS_KEY"], rabbitmq.url, "at-secret", "rt-secret"):
        assert secret not in everything


def test_listing_keeps_every_dead_letter_in_place_and_in_order(host_env, operator_env, rabbitmq, capsys):
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    assert run_cli(host_env, "run", "--once", "--queue-prefix", prefix).returncode == 0
    queue = prefix + "check-expiring.dead-letter"
    ids = [f"m-{n:02d}" for n in range(25)]
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        for message_id in ids:  # as the local host parks them
            headers = {"x-dead-letter-reason": "MaxDeliveryCountExceeded", "x-delivery-count": 3}
            channel.basic_publish("", queue, b"{}", pika.BasicProperties(message_id=message_id, headers=headers))

        for argv in (["--limit", "10"], ["--limit", "10"], [], ["--limit", "30"]):
            assert main(["dead-letters", "--queue-prefix", prefix, "--queue", "check-expiring", *argv]) == 0
            shown = re.findall(r"messageId=(\S+)", outputs(capsys)[0])
            assert shown == ids[: len(shown)]
            assert len(shown) == min(25, int(argv[1]) if argv else 100)

        remaining = []
        while (delivery := channel.basic_get(queue, auto_ack=True))[0] is not None:
            remaining.append(delivery[1].message_id)
        assert remaining == ids


def test_dead_letters_with_a_prefix_run_never_used_says_so(operator_env, rabbitmq, capsys):
    assert main(["dead-letters", "--queue-prefix", "never-declared."]) == 1
    err = outputs(capsys)[1]
    assert "RabbitMQ queue 'never-declared.check-expiring.dead-letter' does not exist" in err
    assert "--queue-prefix" in err


# dead letters on Service Bus, at the SDK boundary ----------------------------------------------------------


def dead_lettered(event, sequence_number: int, *, deliveries: int = 10, reason: str = "MaxDeliveryCountExceeded"):
    """The dead letter Service Bus would deliver for `event` as the app sent it: the app's outgoing
    message (ServiceBusTransport), plus what the broker adds, encoded to AMQP bytes and decoded by
    the SDK into its ServiceBusReceivedMessage (bytes keys and all)."""
    client = RecordingClient()
    ServiceBusTransport(client).send([event])
    [[outgoing]] = client.senders[event.type].sent_batches
    return received_message(
        PyamqpTransport.to_outgoing_amqp_message(outgoing.raw_amqp_message), sequence_number, deliveries, reason
    )


def received_message(amqp, sequence_number: int, deliveries: int, reason: str):
    enqueued_ms = int(datetime(2026, 11, 26, 14, 0, sequence_number, tzinfo=UTC).timestamp() * 1000)
    amqp = amqp._replace(
        header=Header(durable=True, delivery_count=deliveries),
        message_annotations={
            **(amqp.message_annotations or {}),
            # As the broker types them: an AMQP timestamp and a long.
            b"x-opt-enqueued-time": {TYPE: AMQPTypes.timestamp, VALUE: enqueued_ms},
            b"x-opt-sequence-number": {TYPE: AMQPTypes.long, VALUE: sequence_number},
        },
        application_properties={
            **(amqp.application_properties or {}),
            "DeadLetterReason": reason,
            "DeadLetterErrorDescription": f"Message could not be consumed after {deliveries} delivery attempts.",
        },
    )
    payload = bytearray()
    encode_payload(payload, amqp)
    return ServiceBusReceivedMessage.from_bytes(bytes(payload))


class DeadLetterReceiver:
    """Records what is done to the dead-letter sub-queue; messages stay until completed."""

    def __init__(self, messages):
        self.available = list(messages)
        self.locked: list = []
        self.completed: list = []
        self.abandoned: list = []
        self.peeks = 0

    def peek_messages(self, max_message_count=1, *, sequence_number=0, timeout=None):
        self.peeks += 1
        pending = sorted(self.available + self.locked, key=lambda m: m.sequence_number)
        return [m for m in pending if m.sequence_number >= (sequence_number or 1)][:max_message_count]

    def receive_messages(self, max_message_count=1, max_wait_time=None):
        batch, self.available = self.available[:max_message_count], self.available[max_message_count:]
        self.locked.extend(batch)
        return batch

    def complete_message(self, message):
        self.locked.remove(message)
        self.completed.append(message)

    def abandon_message(self, message):
        self.locked.remove(message)
        self.abandoned.append(message)
        self.available = sorted([*self.available, message], key=lambda m: m.sequence_number)

    def close(self):
        self.available = sorted(self.available + self.locked, key=lambda m: m.sequence_number)
        self.locked = []


class Sender:
    def __init__(self, fail: bool = False):
        self.sent: list = []
        self.fail = fail

    def send_messages(self, message):
        if self.fail:
            raise ServiceBusConnectionError(message=f"link detached (SharedAccessKey={SHARED_ACCESS_KEY})")
        self.sent.append(message)

    def close(self):
        pass


class DeadLetterClient:
    def __init__(self, dead_letters: dict, fail_sends: bool = False):
        self.receivers = {queue: DeadLetterReceiver(messages) for queue, messages in dead_letters.items()}
        self.senders: dict[str, Sender] = {}
        self.fail_sends = fail_sends

    def get_queue_receiver(self, queue, *, sub_queue=None, **kwargs):
        assert sub_queue == ServiceBusSubQueue.DEAD_LETTER
        return self.receivers.setdefault(queue, DeadLetterReceiver([]))

    def get_queue_sender(self, queue):
        return self.senders.setdefault(queue, Sender(self.fail_sends))

    def close(self):
        pass


@pytest.fixture
def service_bus_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("shared.cli.APP_ROOT", tmp_path)
    for name in ("RABBITMQ_URL", "COSMOS_ENDPOINT", "COSMOS_KEY", "ServiceBusConnection__fullyQualifiedNamespace"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ServiceBusConnection", CONNECTION_STRING)
    runtime.reset()
    yield
    runtime.reset()


def use_client(monkeypatch, client):
    monkeypatch.setattr(operator_commands, "service_bus_client", lambda settings: client)


def a_request(connection_id: str):
    now = utc_now()
    data = RefreshRequestedData(
        connection_id=connection_id, integration_id="hubspot", tenant_id="t-1", expires_at=now, requested_at=now
    )
    return make_event(data, event_id=f"request-{connection_id}")


def test_service_bus_listing_peeks_and_formats_without_settling(service_bus_env, monkeypatch, capsys):
    poison = received_message(PyamqpTransport.build_message(data=[b"not json"]), 9, deliveries=10, reason="Poison")
    client = DeadLetterClient({REFRESH_REQUESTED: [dead_lettered(a_request("conn-1"), 7), poison]})
    use_client(monkeypatch, client)

    assert main(["dead-letters"]) == 0  # Service Bus is the default when it is configured
    first, _ = outputs(capsys)
    assert main(["dead-letters", "--transport", "service-bus"]) == 0
    assert outputs(capsys)[0] == first
    receiver = client.receivers[REFRESH_REQUESTED]
    assert (receiver.completed, receiver.abandoned, receiver.locked) == ([], [], [])
    assert len(receiver.available) == 2

    assert "Dead letters on Service Bus:" in first
    assert f"check-expiring: no dead letters in '{CHECK_EXPIRING}/$deadletterqueue'" in first
    assert f"refresh-requested: 2 dead letter(s) in '{REFRESH_REQUESTED}/$deadletterqueue'" in first
    assert (
        f"  1. messageId=request-conn-1  type={REFRESH_REQUESTED}  connectionId=conn-1  deliveries=10  "
        "enqueued=2026-11-26T14:00:07.000Z  sequenceNumber=7\n"
        "     reason: MaxDeliveryCountExceeded — Message could not be consumed after 10 delivery attempts.\n"
    ) in first
    assert "  2. messageId=-  type=-  connectionId=-  deliveries=10  enqueued=2026-11-26T14:00:09.000Z" in first
    assert SHARED_ACCESS_KEY not in first


def test_service_bus_listing_pages_up_to_the_limit(service_bus_env, monkeypatch, capsys):
    letters = [dead_lettered(a_request(f"conn-{n}"), n) for n in range(1, 6)]
    client = DeadLetterClient({REFRESH_REQUESTED: letters})
    use_client(monkeypatch, client)
    monkeypatch.setattr(operator_commands, "SERVICE_BUS_PAGE", 2)
    assert main(["dead-letters", "--queue", "refresh-requested", "--limit", "3"]) == 0
    out, _ = outputs(capsys)
    assert re.findall(r"messageId=(\S+)", out) == ["request-conn-1", "request-conn-2", "request-conn-3"]
    assert "3 dead letter(s) shown; more may exist (raise --limit)" in out


def test_service_bus_replay_sends_the_same_message_again_and_completes_the_dead_letter(
    service_bus_env, monkeypatch, capsys
):
    event = a_request("conn-1")
    letter = dead_lettered(event, 7)
    client = DeadLetterClient({REFRESH_REQUESTED: [letter]})
    use_client(monkeypatch, client)

    assert main(["dead-letters", "--queue", "refresh-requested", "--replay"]) == 0
    out, _ = outputs(capsys)

    [sent] = client.senders[REFRESH_REQUESTED].sent
    assert isinstance(sent, ServiceBusMessage)
    assert not isinstance(sent, ServiceBusReceivedMessage)
    assert b"".join(sent.body) == event.to_json() == b"".join(letter.body)
    assert sent.message_id == event.id
    assert sent.content_type == CONTENT_TYPE
    assert sent.application_properties == {"type": REFRESH_REQUESTED}  # str keys; no DeadLetter* properties
    assert sent.session_id == letter.session_id is not None  # the refresh queue is session-enabled
    receiver = client.receivers[REFRESH_REQUESTED]
    assert receiver.completed == [letter]
    assert (receiver.available, receiver.abandoned) == ([], [])
    assert f"refresh-requested: replaying from '{REFRESH_REQUESTED}/$deadletterqueue' to '{REFRESH_REQUESTED}'" in out
    assert "messageId=request-conn-1" in out
    assert f"replayed 1 message(s) to '{REFRESH_REQUESTED}'" in out
    assert "duplicate detection" in out


def test_service_bus_replay_keeps_a_message_it_could_not_send(service_bus_env, monkeypatch, capsys):
    letters = [dead_lettered(a_request("conn-1"), 1), dead_lettered(a_request("conn-2"), 2)]
    client = DeadLetterClient({CHECK_EXPIRING: [], REFRESH_REQUESTED: letters}, fail_sends=True)
    use_client(monkeypatch, client)
    assert main(["dead-letters", "--replay"]) == 1
    out, err = outputs(capsys)
    assert "check-expiring: no dead letters" in out
    assert "could not send message request-conn-1 back to 'integration.token.refresh-requested'" in err
    assert "ServiceBusConnectionError" in err
    assert "it stays in the dead-letter queue" in err
    assert SHARED_ACCESS_KEY not in out + err
    receiver = client.receivers[REFRESH_REQUESTED]
    assert receiver.completed == []
    assert [m.message_id for m in receiver.available] == ["request-conn-1", "request-conn-2"]


def test_service_bus_transport_needs_service_bus_settings(operator_env, capsys):
    assert main(["dead-letters", "--transport", "service-bus"]) == 2
    assert "needs ServiceBusConnection" in outputs(capsys)[1]


# usage and output hygiene -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["trigger", "now"],
        ["refresh"],
        ["refresh", "salesforce"],
        ["refresh", "", "conn-1"],
        ["refresh", "salesforce", "conn-1", "--tenant", " "],
        ["dead-letters", "--limit", "0"],
        ["dead-letters", "--limit", "lots"],
        ["dead-letters", "--limit", "100001"],
        ["dead-letters", "--queue", "refreshed"],
        ["dead-letters", "--transport", "kafka"],
        ["dead-letters", "--transport", "service-bus", "--queue-prefix", "x."],
        ["dead-letter"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_scrubber_removes_every_secret_setting_and_control_characters():
    settings = load_settings(
        {
            "ServiceBusConnection": CONNECTION_STRING,
            "RABBITMQ_URL": "amqp://app:s3cr%21t-pass@rabbit:5672/",
            "COSMOS_KEY": "cosmos-key-value",
            "INTEGRATION_MANAGER_TOKEN": MANAGER_TOKEN,
        }
    )
    scrub = Scrubber(settings)
    text = f"{SHARED_ACCESS_KEY} s3cr!t-pass s3cr%21t-pass cosmos-key-value {MANAGER_TOKEN} \x1b[31mred\n"
    assert scrub(text) == "*** *** *** *** *** \\x1b[31mred\\n"
    assert scrub("x" * 500, 50) == "x" * 49 + "…"
