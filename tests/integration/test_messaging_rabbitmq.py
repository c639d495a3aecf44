"""The RabbitMQ bridge against a real broker: contract properties, confirms, reconnects, threads."""

import threading
import time

import pika
import pytest

from shared.errors import PublishError
from shared.events import CONTENT_TYPE, REFRESH_REQUESTED
from shared.messaging import RabbitMqTransport
from tests.support.event_taps import EventTap
from tests.support.helpers import numbered_refresh_request


@pytest.fixture
def transport(rabbitmq, exchange):
    publisher = RabbitMqTransport(rabbitmq.url, exchange)
    yield publisher
    publisher.close()


def test_events_are_persistent_routed_by_type_and_carry_their_id(transport, event_tap):
    event = numbered_refresh_request(1)
    transport.send([event])
    [captured] = event_tap.drain()
    assert captured.routing_key == REFRESH_REQUESTED
    assert captured.properties.message_id == event.id
    assert captured.properties.content_type == CONTENT_TYPE
    assert captured.properties.delivery_mode == 2
    assert captured.body["data"]["connectionId"] == "conn-1"


def test_exchange_is_a_durable_topic_exchange(transport, rabbitmq, exchange):
    transport.send([numbered_refresh_request(1)])
    listing = rabbitmq.ctl("list_exchanges", "name", "type", "durable")
    assert f"{exchange}\ttopic\ttrue" in listing


def test_publishes_after_the_broker_dropped_the_connection(transport, rabbitmq, exchange):
    transport.send([numbered_refresh_request(1)])
    rabbitmq.ctl("close_all_connections", "test: simulate a dropped connection")
    tap = EventTap(rabbitmq.url, exchange)
    try:
        transport.send([numbered_refresh_request(2)])
        assert [event.body["data"]["connectionId"] for event in tap.drain()] == ["conn-2"]
    finally:
        tap.close()
    assert transport.connections_opened == 2


def test_concurrent_invocations_share_one_connection_safely(transport, event_tap):
    def publish_many(worker: int) -> None:
        for n in range(50):
            transport.send([numbered_refresh_request(worker * 1000 + n)])

    threads = [threading.Thread(target=publish_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = [event.body["data"]["connectionId"] for event in event_tap.drain()]
    assert sorted(received) == sorted(f"conn-{w * 1000 + n}" for w in range(8) for n in range(50))
    assert transport.connections_opened == 1


class CountingLock:
    """A lock that tells how many threads are waiting for it."""

    def __init__(self):
        self._lock, self._count_lock, self.waiting = threading.Lock(), threading.Lock(), 0

    def __enter__(self):
        with self._count_lock:
            self.waiting += 1
        self._lock.acquire()
        with self._count_lock:
            self.waiting -= 1

    def __exit__(self, *exc):
        self._lock.release()


def test_concurrent_sends_share_confirm_round_trips(transport, event_tap):
    # While one thread waits for the broker's confirms, the others queue their events; the next
    # thread to hold the connection publishes all of them and one round trip settles them together.
    transport.send([numbered_refresh_request(0)])  # connected: what follows is only publishing
    senders, waits, all_waiting = 8, [], threading.Event()
    transport._lock = lock = CountingLock()
    wait_as_is = transport._await_confirms

    def counted_wait(settled):
        waits.append(1)
        if len(waits) == 1:  # hold the first round trip until every other sender waits for the connection
            for _ in range(1000):
                if lock.waiting == senders - 1:
                    all_waiting.set()
                    break
                threading.Event().wait(0.005)
        wait_as_is(settled)

    transport._await_confirms = counted_wait
    threads = [
        threading.Thread(target=transport.send, args=([numbered_refresh_request(n)],)) for n in range(1, senders + 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all_waiting.is_set()
    assert sorted(event.body["data"]["connectionId"] for event in event_tap.drain()) == sorted(
        f"conn-{n}" for n in range(senders + 1)
    )
    assert len(waits) < senders, "each send waited for a round trip of its own"


def test_a_dropped_connection_during_concurrent_sends_loses_no_confirmed_event(transport, rabbitmq, tap):
    confirmed: list[str] = []
    failures: list[BaseException] = []
    dropped = threading.Event()

    def publish_until_after_the_drop(worker: int) -> None:
        for n in range(100_000):
            event = numbered_refresh_request(worker * 100_000 + n)
            try:
                transport.send([event])
            except pika.exceptions.AMQPError as error:
                failures.append(error)
            else:
                confirmed.append(event.data["connectionId"])
            if dropped.is_set() and transport.connections_opened == 2:
                return  # published again on the new connection

    threads = [threading.Thread(target=publish_until_after_the_drop, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    rabbitmq.ctl("close_all_connections", "test: drop the connection mid-publish")  # publishing meanwhile
    dropped.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    received = {event.body["data"]["connectionId"] for event in tap.everything()}
    assert set(confirmed) <= received, "a send returned but its event never reached the broker"
    assert len(failures) <= 8, "a lost connection should cost at most the sends in flight"
    assert transport.connections_opened == 2


@pytest.mark.parametrize("confirm_window", [3, 200])
def test_a_batch_larger_than_the_confirm_window_is_entirely_confirmed_when_send_returns(
    rabbitmq, exchange, event_tap, confirm_window
):
    # 1,000 events (a page may hold that many): once the broker's acks (multiple=True) emptied the window mid-batch,
    # send used to return with the batch's tail unconfirmed -- still in pika's output buffer, not even sent. A
    # window of 3 empties it often enough to show that nearly every time; 200 is the default.
    transport = RabbitMqTransport(rabbitmq.url, exchange, confirm_window=confirm_window)
    try:
        transport.send([numbered_refresh_request(n) for n in range(1000)])
        # Routed before confirmed: every event is in the tap's queue the moment send returns.
        assert event_tap.channel.queue_declare(event_tap.queue, passive=True).method.message_count == 1000
    finally:
        transport.close()
    received = [event.body["data"]["connectionId"] for event in event_tap.drain()]
    assert sorted(received) == sorted(f"conn-{n}" for n in range(1000))


def test_events_the_broker_refuses_in_a_large_batch_fail_the_send(rabbitmq, exchange, transport):
    # A queue that refuses what exceeds its length (x-overflow reject-publish): the broker nacks those events.
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        arguments = {"x-max-length": 950, "x-overflow": "reject-publish"}
        queue = channel.queue_declare("", exclusive=True, arguments=arguments).method.queue
        channel.queue_bind(queue, exchange, routing_key="#")
        with pytest.raises(PublishError, match=r"refused 50 of 1000 event\(s\)"):
            transport.send([numbered_refresh_request(n) for n in range(1000)])
    finally:
        connection.close()


def test_an_event_pika_cannot_publish_fails_its_own_send_at_once_and_the_connection_stays(transport, event_tap):
    # Sender A fills its confirm window; sender B queues a batch meanwhile, which A's thread then publishes. Its
    # second event cannot be sent (a routing key over AMQP's 255 bytes): basic_publish raises before that event
    # is in flight. That error used to leave A's send, whose events were fine, and B's send returned as if all
    # of B had been sent once its first event was confirmed. (With the unsendable event first, B's batch was
    # orphaned: tests/unit/test_messaging_rabbitmq.py.)
    transport._confirm_window = 2
    unsendable = numbered_refresh_request(3).model_copy(update={"type": "t" * 256})
    b_started, outcome = threading.Event(), {}
    wait_as_is = transport._await_confirms

    def wait_until_b_queued(settled):
        if not b_started.is_set():
            b_started.set()
            for _ in range(1000):
                if transport._queued:
                    break
                threading.Event().wait(0.005)
        wait_as_is(settled)

    def send(name, events):
        started = time.monotonic()
        try:
            transport.send(events)
            outcome[name] = None
        except Exception as error:  # noqa: BLE001 - what the send raised is the test's subject
            outcome[name] = error
        outcome[f"{name} seconds"] = time.monotonic() - started

    transport.send([numbered_refresh_request(0)])  # connected
    transport._await_confirms = wait_until_b_queued
    a = threading.Thread(target=send, args=("A", [numbered_refresh_request(1), numbered_refresh_request(2)]))
    a.start()
    assert b_started.wait(10)
    b = threading.Thread(target=send, args=("B", [numbered_refresh_request(4), unsendable]))
    b.start()
    for thread in (a, b):
        thread.join(timeout=20)
    assert outcome["A"] is None
    assert isinstance(outcome["B"], PublishError)
    assert "could not publish event id-3" in str(outcome["B"])
    assert outcome["B seconds"] < 5, "B waited out the confirm timeout"
    transport.send([numbered_refresh_request(5)])  # the connection still serves
    received = {event.body["data"]["connectionId"] for event in event_tap.drain()}
    assert {"conn-0", "conn-1", "conn-2", "conn-5"} <= received  # conn-4 too, perhaps: B's sender retries it anyway
    assert transport.connections_opened == 1
