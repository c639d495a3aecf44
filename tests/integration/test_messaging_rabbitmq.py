"""The RabbitMQ bridge against a real broker: contract properties, confirms, reconnects, threads."""

import threading

import pika
import pytest

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
