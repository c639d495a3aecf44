"""RabbitMQ transport without a broker: an address nobody listens on fails at once, and a scripted AMQP 0-9-1
peer on a loopback port (the real pika client talks to it) acks, nacks and closes channels exactly when a
test needs it, which a real broker does not do on demand. Against a real RabbitMQ node:
tests/integration/test_messaging_rabbitmq.py."""

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import pika
import pytest
from pika import frame, spec

from shared.errors import PublishError
from shared.messaging import RabbitMqTransport
from tests.support.helpers import numbered_refresh_request


def test_unreachable_broker_raises_instead_of_hanging(exchange):
    transport = RabbitMqTransport("amqp://guest:guest@127.0.0.1:1/%2F", exchange)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        transport.send([numbered_refresh_request(1)])


Script = Callable[[int], list[spec.Basic.Ack | spec.Basic.Nack | spec.Channel.Close]]


class ScriptedBroker:
    """Answers pika's handshake, channel, exchange.declare and confirm.select like RabbitMQ; for the n-th
    message published on a channel it sends what `script(n)` returns, in one write (acks and nacks, usually
    with multiple=True, or a channel.close). `script` runs on the broker's thread and may block it."""

    def __init__(self, script: Script):
        self.script = script
        self.connections = 0
        self.received = 0  # messages published to it, on every channel
        self.confirmed_through = 0  # the highest delivery tag acked or nacked so far (on the last channel)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._clients: list[socket.socket] = []
        self.url = f"amqp://guest:guest@127.0.0.1:{self._server.getsockname()[1]}/%2F"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        """Stop listening and drop every connection (a sender still waiting on one then sees it lost)."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        self._server.close()
        for client in self._clients:
            with contextlib.suppress(OSError):  # already closed by the client
                client.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)
            threading.Thread(target=self._talk, args=(client,), daemon=True).start()

    def _talk(self, client: socket.socket) -> None:
        buffer, tags, content = b"", {}, {}
        with client, contextlib.suppress(OSError):  # OSError: the client dropped the connection
            while data := client.recv(65536):
                buffer += data
                while True:
                    consumed, received = frame.decode_frame(buffer)
                    if received is None:
                        break
                    buffer = buffer[consumed:]
                    replies = self._answer(received, tags, content)
                    if replies is None:
                        return
                    client.sendall(b"".join(frame.Method(channel, method).marshal() for channel, method in replies))

    def _answer(self, received, tags: dict[int, int], content: dict[int, int]) -> list | None:
        channel = getattr(received, "channel_number", 0)
        if isinstance(received, frame.ProtocolHeader):
            capabilities = {"publisher_confirms": True, "basic.nack": True}
            return [(0, spec.Connection.Start(server_properties={"capabilities": capabilities}))]
        if isinstance(received, frame.Header):
            content[channel] = received.body_size
            return self._published(channel, tags) if received.body_size == 0 else []
        if isinstance(received, frame.Body):
            content[channel] -= len(received.fragment)
            return self._published(channel, tags) if content[channel] == 0 else []
        method = received.method
        if isinstance(method, spec.Connection.Close):
            return None
        answers = {
            spec.Connection.StartOk: spec.Connection.Tune(channel_max=64, frame_max=131072, heartbeat=0),
            spec.Connection.Open: spec.Connection.OpenOk(),
            spec.Channel.Open: spec.Channel.OpenOk(),
            spec.Channel.Close: spec.Channel.CloseOk(),
            spec.Exchange.Declare: spec.Exchange.DeclareOk(),
            spec.Confirm.Select: spec.Confirm.SelectOk(),
        }
        if isinstance(method, spec.Channel.Open):
            tags[channel] = 0
        answer = answers.get(type(method))
        return [(channel, answer)] if answer is not None else []  # Basic.Publish: its content follows

    def _published(self, channel: int, tags: dict[int, int]) -> list:
        if channel not in tags:  # a channel closed by the broker: RabbitMQ drops what still comes on it
            return []
        self.received += 1
        tags[channel] += 1
        replies = self.script(tags[channel])
        for reply in replies:
            if isinstance(reply, spec.Channel.Close):
                del tags[channel]
            else:
                self.confirmed_through = max(self.confirmed_through, reply.delivery_tag)
        return [(channel, reply) for reply in replies]


def ack(tag: int) -> spec.Basic.Ack:
    return spec.Basic.Ack(delivery_tag=tag, multiple=True)


def nack(tag: int) -> spec.Basic.Nack:
    return spec.Basic.Nack(delivery_tag=tag, multiple=True, requeue=False)


@pytest.fixture
def scripted():
    """scripted(script, **transport options) -> (broker, transport), both closed after the test."""
    opened: list = []

    def start(script: Script, **options) -> tuple[ScriptedBroker, RabbitMqTransport]:
        broker = ScriptedBroker(script)
        transport = RabbitMqTransport(broker.url, "test.events", **options)
        opened.append((broker, transport))
        return broker, transport

    yield start
    for broker, transport in opened:
        broker.close()  # first: a sender a failing test left waiting on the connection sees it lost, and stops
        transport.close()


def confirms_a_window_behind(last: int) -> Script:
    """What defect 8 was found with (confirm window 200): the first ack (multiple=True) covers half the window,
    each later one everything published so far, so the window empties completely at 300, 500, 700 and 900 while
    a batch of 1,000 still has 100 events to publish; those are confirmed by `last(1000)` once they arrive."""

    def script(tag: int) -> list:
        if tag == 200:
            return [ack(100)]
        if tag in (300, 500, 700, 900):
            return [ack(tag)]
        return last(tag) if tag == 1000 else []

    return script


def test_a_batch_larger_than_the_confirm_window_returns_only_once_its_tail_is_confirmed(scripted):
    broker, transport = scripted(confirms_a_window_behind(lambda tag: [ack(tag)]), confirm_window=200)
    transport.send([numbered_refresh_request(n) for n in range(1000)])
    assert broker.received == 1000, "send returned before the batch's tail even reached the broker"
    assert broker.confirmed_through == 1000, "send returned with events the broker never confirmed"


def test_a_nack_for_the_tail_of_a_batch_larger_than_the_confirm_window_is_raised(scripted):
    _, transport = scripted(confirms_a_window_behind(lambda tag: [nack(tag)]), confirm_window=200)
    with pytest.raises(PublishError, match=r"refused 100 of 1000 event\(s\)"):
        transport.send([numbered_refresh_request(n) for n in range(1000)])


class TwoSenders:
    """Sender A publishes `a_events` (as many as the confirm window: A waits for confirms once its window is
    full); sender B queues its batch meanwhile, so the thread driving A's send publishes B's batch too. The
    broker holds its answer to A's last message until B's batch is queued: `gate(replies)` in a script."""

    def __init__(self, a_events: int, b_events: list):
        self.a_events, self.b_events = a_events, b_events
        self._a_publishing, self._b_queued = threading.Event(), threading.Event()
        self.gated = False  # the held answer was given
        self.outcome: dict[str, BaseException | float | None] = {}

    def gate(self, replies: list) -> list:
        self._a_publishing.set()
        assert self._b_queued.wait(5), "sender B never queued its batch"
        self.gated = True
        return replies

    def run(self, transport: RabbitMqTransport) -> None:
        def send(name: str, events: list) -> None:
            started = time.monotonic()
            try:
                transport.send(events)
            except BaseException as error:  # noqa: BLE001 - what the sender raised is the test's subject
                self.outcome[name] = error
            else:
                self.outcome[name] = None
            self.outcome[f"{name} seconds"] = time.monotonic() - started

        a_events = [numbered_refresh_request(n) for n in range(self.a_events)]
        a = threading.Thread(target=send, args=("A", a_events))
        a.start()
        assert self._a_publishing.wait(5), "sender A never filled its confirm window"
        b = threading.Thread(target=send, args=("B", self.b_events))
        b.start()
        deadline = time.monotonic() + 5
        while not transport._queued and time.monotonic() < deadline:  # B's send queued its batch: A will take it
            time.sleep(0.001)
        self._b_queued.set()
        for thread in (a, b):
            thread.join(timeout=10)
            assert not thread.is_alive(), "a sender still waits for confirms"


def test_multiple_confirms_across_two_senders_batches_fail_only_the_nacked_batch(scripted):
    senders = TwoSenders(a_events=4, b_events=[numbered_refresh_request(n) for n in range(100, 104)])
    # A's 4 events fill the window (4): the broker acks 1-2 once B is queued, and A's thread goes on with B's
    # batch (5-8). One ack (multiple=True) covers A's last two and B's first; one nack B's other three.
    replies = {6: [ack(5)], 8: [nack(8)]}
    _, transport = scripted(lambda tag: senders.gate([ack(2)]) if tag == 4 else replies.get(tag, []), confirm_window=4)
    senders.run(transport)
    assert senders.outcome["A"] is None
    assert isinstance(senders.outcome["B"], PublishError)
    assert "refused 3 of 4 event(s)" in str(senders.outcome["B"])


def test_a_batch_taken_from_the_queue_when_the_channel_closed_is_sent_again_at_once(scripted):
    """Defect 9: the broker closed the channel (with A's window confirmed) while A's thread drove the connection;
    A's thread took B's batch and basic_publish raised before any of it was in flight. B's batch was then
    neither queued, failed nor in flight: B waited out the confirm timeout and then closed a healthy
    connection. Now it is queued again at once and sent on a new channel of the same connection."""
    senders = TwoSenders(a_events=4, b_events=[numbered_refresh_request(n) for n in range(100, 104)])
    channel_closed = spec.Channel.Close(406, "PRECONDITION_FAILED - test", class_id=60, method_id=40)
    broker, transport = scripted(
        lambda tag: [ack(tag)] if senders.gated else senders.gate([ack(4), channel_closed]) if tag == 4 else [],
        confirm_window=4,
        confirm_timeout_s=3,
    )
    senders.run(transport)
    assert senders.outcome["A"] is None
    assert senders.outcome["B"] is None
    assert senders.outcome["B seconds"] < 1, "B waited for confirms of a batch that was never sent"
    assert broker.received == 8
    assert broker.connections == 1, "a healthy connection was closed"
    assert transport.connections_opened == 1


def test_an_event_pika_cannot_publish_fails_its_own_batch_at_once_not_the_one_driving(scripted):
    """Defect 9, the other way basic_publish raises before a taken batch is in flight: pika refuses the event
    (a routing key over AMQP's 255 bytes: CloudEvent allows a 256-character type). The error used to leave
    the send of the thread driving the connection, whose events were fine, while B's batch was orphaned."""
    unsendable = numbered_refresh_request(100).model_copy(update={"type": "t" * 256})
    senders = TwoSenders(a_events=4, b_events=[unsendable, numbered_refresh_request(101)])
    broker, transport = scripted(
        lambda tag: [ack(tag)] if senders.gated else senders.gate([ack(4)]) if tag == 4 else [],
        confirm_window=4,
        confirm_timeout_s=3,
    )
    senders.run(transport)
    assert senders.outcome["A"] is None
    assert isinstance(senders.outcome["B"], PublishError)
    assert "could not publish event id-100" in str(senders.outcome["B"])
    assert senders.outcome["B seconds"] < 1, "B waited out the confirm timeout"
    assert broker.connections == 1, "a healthy connection was closed"
    transport.send([numbered_refresh_request(102)])  # the connection still serves
    assert broker.connections == 1


def test_confirms_that_never_come_fail_the_send_after_the_confirm_timeout(scripted):
    """The confirm timeout's timer (the blocking connection's call_later) never fired while the transport waited
    for confirms: a broker that stopped confirming kept the send waiting as long as the connection lived."""
    broker, transport = scripted(lambda tag: [], confirm_timeout_s=0.3)
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            transport.send([numbered_refresh_request(1)])
        except BaseException as error:  # noqa: BLE001 - what the send raised is the test's subject
            outcome.append(error)

    started = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive(), "the send still waits for confirms, long after the confirm timeout"
    assert isinstance(outcome[0], pika.exceptions.AMQPConnectionError)
    assert "no publisher confirms within the timeout" in str(outcome[0])
    assert time.monotonic() - started < 2  # two attempts (one reconnect), 0.3 s each
    assert broker.connections == 2
