"""Operator commands of `python -m localdev`: `trigger`, `refresh`, `dead-letters`, against the real
local services (the commands in-process through `localdev.cli.main`, the local host as a subprocess,
as in test_end_to_end.py). Usage errors, the scrubber and the Service Bus dead-letter path at the SDK
boundary, without services: tests/unit/test_operator_commands.py."""

import json
import re
import uuid
from datetime import timedelta

import pika
import pytest

from localdev.cli import main
from localdev.local_host import LocalHost
from localdev.stand_in_manager import Answer
from shared import runtime
from shared.connection_store import ExpiringConnection
from shared.events import (
    CHECK_EXPIRING,
    CONTENT_TYPE,
    REFRESH_REQUESTED,
    CheckExpiringData,
    RefreshedData,
    make_event,
    parse_event,
)
from shared.expiring_check import refresh_requested_event, request_refresh_for_expiring_connections
from shared.messaging import ServiceBusTransport, publisher_from_settings
from shared.settings import load_settings
from shared.times import parse_time, utc_now
from tests.support.cosmos_faults import CosmosFaults
from tests.support.documents import upsert_connection
from tests.support.helpers import MANAGER_TOKEN, cli_environment, outputs, run_cli
from tests.support.network import closed_port
from tests.support.service_bus import CONNECTION_STRING, RecordingClient

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
    upsert_connection(cosmos_container, "conn-1")
    commands = {CHECK_EXPIRING: ["trigger"], REFRESH_REQUESTED: ["refresh", "salesforce", "conn-1"]}
    for event_type, argv in commands.items():
        assert main(argv) == 1
        out, err = outputs(capsys)
        assert out == ""
        assert f"no queue is bound to exchange '{exchange}' for routing key {event_type}" in err
        assert "start the local host first (`python -m localdev run`)" in err

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
    document = upsert_connection(cosmos_container, "conn-1", expires_in_h=0.5)  # due: the check below requests it too
    upsert_connection(cosmos_container, "conn-1", tenant="t-2", integration="google")  # same id, another integration

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
    upsert_connection(cosmos_container, "conn-1")
    upsert_connection(cosmos_container, "conn-revoked", status="revoked")
    upsert_connection(cosmos_container, "conn-disabled", status="Disabled")
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


def test_refresh_says_when_its_request_already_ended(cli_env, operator_env, cosmos_container, manager, capsys):
    upsert_connection(cosmos_container, "conn-x")
    manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    assert run_cli(cli_env, "run", "--once", "--queue-prefix", prefix).returncode == 0
    assert main(["refresh", "salesforce", "conn-x"]) == 0
    first, _ = outputs(capsys)
    assert "note:" not in first
    result = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix)
    assert "failed 1" in result.stdout
    assert "invalid_grant" in result.stdout

    # Same connection, same expiresAt: same request id, which ended with a permanent failure.
    assert main(["refresh", "salesforce", "conn-x"]) == 0
    again, _ = outputs(capsys)
    assert re.findall(r"eventId=(\S+)", again) == re.findall(r"eventId=(\S+)", first)
    assert "note: this request id already ended (failed); sync_refresh_handler will not call" in again
    result = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix)
    assert "refreshed 0, failed 0" in result.stdout
    # The same round of the same request: the same MessageId, which the refresh queue's duplicate detection drops
    # (on Azure as in the local host); the claim would have said "this request was already handled".
    [request_id] = re.findall(r"eventId=(\S+)", again)
    assert f"Duplicate refresh request {request_id} dropped" in result.stderr
    assert len(manager.calls) == 1  # integration-manager was not called again


def test_refresh_with_cosmos_misconfigured_fails_clearly(operator_env, monkeypatch, event_tap, capsys):
    monkeypatch.setenv("COSMOS_CONNECTIONS_CONTAINER", "no_such_container")
    assert main(["refresh", "salesforce", "conn-1"]) == 1
    err = outputs(capsys)[1]
    assert "error: Cosmos DB database 'integrations' has no container 'no_such_container'" in err
    assert "COSMOS_CONNECTIONS_CONTAINER" in err
    assert operator_env["COSMOS_KEY"] not in err
    assert event_tap.drain() == []


def test_refresh_needs_the_tenant_when_several_tenants_have_the_connection(
    operator_env, cosmos_container, event_tap, capsys
):
    upsert_connection(cosmos_container, "conn-1", tenant="t-1")
    upsert_connection(cosmos_container, "conn-1", tenant="t-2")
    with pytest.raises(SystemExit) as raised:
        main(["refresh", "salesforce", "conn-1"])
    assert raised.value.code == 2
    err = outputs(capsys)[1]
    assert "exists in 2 tenants ('t-1', 't-2'); pass --tenant TENANT_ID" in err
    assert "usage: python -m localdev refresh" in err
    assert event_tap.drain() == []

    assert main(["refresh", "salesforce", "conn-1", "--tenant", "t-2"]) == 0
    [captured] = event_tap.drain()
    assert captured.body["data"]["tenantId"] == "t-2"


# dead letters on the local host's RabbitMQ ---------------------------------------------------------------


def dead_letter_queue_depth(url: str, queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def test_dead_letters_lists_poison_messages_without_consuming_then_replays_one(
    cli_env, operator_env, rabbitmq, exchange, manager, capsys
):
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    # One worker: the order of its log lines is the order it dead-letters in.
    run = ("run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3", "--workers", "1")
    assert run_cli(cli_env, *run).returncode == 0  # declares the local host's queues
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
    result = run_cli(cli_env, *run)
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
    result = run_cli(cli_env, *run)
    assert "dead-lettered 1" in result.stdout
    # The function sees the replay's own MessageId (`<id>.replay-<ms>`), as on Service Bus.
    assert re.findall(r"failed on message (p-\d)\.replay-\d+ \((delivery \d of 3)\)", result.stderr) == [
        (oldest, "delivery 2 of 3"),
        (oldest, "delivery 3 of 3"),
    ]
    assert main([*listing, "--queue", "refresh-requested"]) == 0
    assert re.findall(r"messageId=(\S+)", outputs(capsys)[0]) == [newest, oldest]
    assert manager.calls == []


def test_replayed_dead_letters_are_processed_once_the_cause_is_fixed(
    cli_env, operator_env, cosmos_container, cosmos_server, manager, rabbitmq, capsys
):
    """A fault of Cosmos (its connections container answering 404 to every document request, after `run` checked
    that it exists) dead-letters a check and an operator's refresh request; `run --once` exits 1 and names them;
    after the fix, `dead-letters --replay` and one `run --once` get both processed."""
    upsert_connection(cosmos_container, "conn-ok", expires_in_h=48)  # not due: only the operator's request refreshes it
    manager.container = cosmos_container
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    run = ("run", "--once", "--queue-prefix", prefix, "--max-deliveries", "3")
    assert run_cli(cli_env, *run).returncode == 0
    assert main(["refresh", "salesforce", "conn-ok"]) == 0
    refresh_out, _ = outputs(capsys)
    [request_id] = re.findall(r"eventId=(\S+)", refresh_out)

    faults = CosmosFaults(cosmos_server)
    faults.inject_fault(path=rf"/colls/{cosmos_container.id}/docs", status=404, times=-1)
    try:
        result = run_cli(cli_env, *run)
    finally:
        faults.clear_faults()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "dead-lettered 2" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the cycle did not end cleanly: the check failed, 2 message(s) dead-lettered (see above)"
    )
    assert manager.calls == []

    listing = ["dead-letters", "--queue-prefix", prefix]
    assert main(listing) == 0
    listed, _ = outputs(capsys)
    [check_id] = re.findall(rf"messageId=(\S+)  type={CHECK_EXPIRING}", listed)
    assert f"dead-lettered: manager_check_handler message {check_id}: CosmosResourceNotFoundError" in result.stdout
    assert f"messageId={request_id}  type={REFRESH_REQUESTED}  connectionId=conn-ok  deliveries=3" in listed
    assert listed.count("CosmosResourceNotFoundError") == 2

    assert main([*listing, "--replay"]) == 0
    replayed, _ = outputs(capsys)
    assert f"check-expiring: replayed 1 message(s) to '{prefix}check-expiring'; 0 left" in replayed
    assert f"refresh-requested: replayed 1 message(s) to '{prefix}refresh-requested'; 0 left" in replayed

    result = run_cli(cli_env, *run)
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


def test_listing_keeps_every_dead_letter_in_place_and_in_order(cli_env, operator_env, rabbitmq, capsys):
    prefix = f"ops-{uuid.uuid4().hex[:8]}."
    assert run_cli(cli_env, "run", "--once", "--queue-prefix", prefix).returncode == 0
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


# dead letters on Service Bus ------------------------------------------------------------------------------


def test_service_bus_transport_needs_service_bus_settings(operator_env, capsys):
    assert main(["dead-letters", "--transport", "service-bus"]) == 2
    assert "needs ServiceBusConnection" in outputs(capsys)[1]
