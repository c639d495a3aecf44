"""Operator commands of `python -m localdev` without services: usage errors, the scrubber, and the
Service Bus dead-letter path at the SDK boundary: dead letters are the SDK's own
ServiceBusReceivedMessage, decoded from the AMQP bytes a broker would deliver, and the receiver/sender
are recording fakes. Against the real local services: tests/e2e/test_operator_commands.py."""

import re
from datetime import UTC, datetime

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus._pyamqp._encode import encode_payload
from azure.servicebus._pyamqp.message import Header
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport
from azure.servicebus.exceptions import ServiceBusConnectionError

from localdev import operator_commands
from localdev.cli import main
from localdev.operator_commands import Scrubber
from shared import runtime
from shared.events import CHECK_EXPIRING, CONTENT_TYPE, REFRESH_REQUESTED, RefreshRequestedData, make_event
from shared.messaging import ServiceBusTransport
from shared.settings import load_settings
from shared.times import utc_now
from tests.support.helpers import MANAGER_TOKEN, outputs
from tests.support.service_bus import CONNECTION_STRING, SHARED_ACCESS_KEY, RecordingClient


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
    monkeypatch.setattr("localdev.cli.APP_ROOT", tmp_path)
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
    # A new MessageId: duplicate detection would drop the original's for its whole window. The body, and so the
    # request id the claim keys on, is the same.
    assert sent.message_id == f"{event.id}.replay-7"
    assert sent.content_type == CONTENT_TYPE
    assert sent.application_properties == {"type": REFRESH_REQUESTED}  # str keys; no DeadLetter* properties
    assert sent.session_id is None  # the refresh queue is not session-enabled
    receiver = client.receivers[REFRESH_REQUESTED]
    assert receiver.completed == [letter]
    assert (receiver.available, receiver.abandoned) == ([], [])
    assert f"refresh-requested: replaying from '{REFRESH_REQUESTED}/$deadletterqueue' to '{REFRESH_REQUESTED}'" in out
    assert "messageId=request-conn-1" in out
    assert f"replayed 1 message(s) to '{REFRESH_REQUESTED}'" in out
    assert "duplicate detection lets through once" in out


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
