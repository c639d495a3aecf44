"""The RabbitMQ bridge against a real broker: contract properties, confirms, reconnects, threads."""

import threading

import pika
import pytest

from shared.events import CONTENT_TYPE, REFRESH_REQUESTED, RefreshRequestedData, make_event, utc_now
from shared.messaging import RabbitMqTransport
from tests.conftest import EventTap


def refresh_request(n: int):
    now = utc_now()
    return make_event(
        RefreshRequestedData(
            connection_id=f"conn-{n}", integration_id="slack", tenant_id="t", expires_at=now, requested_at=now
        )
    )


@pytest.fixture
def transport(rabbitmq, exchange):
    publisher = RabbitMqTransport(rabbitmq.url, exchange)
    yield publisher
    publisher.close()


def test_events_are_persistent_routed_by_type_and_carry_their_id(transport, event_tap):
    event = refresh_request(1)
    transport.send([event])
    [captured] = event_tap.drain()
    assert captured.routing_key == REFRESH_REQUESTED
    assert captured.properties.message_id == event.id
    assert captured.properties.content_type == CONTENT_TYPE
    assert captured.properties.delivery_mode == 2
    assert captured.body["data"]["connectionId"] == "conn-1"


def test_exchange_is_a_durable_topic_exchange(transport, rabbitmq, exchange):
    transport.send([refresh_request(1)])
    listing = rabbitmq.ctl("list_exchanges", "name", "type", "durable")
    assert f"{exchange}\ttopic\ttrue" in listing


def test_publishes_after_the_broker_dropped_the_connection(transport, rabbitmq, exchange):
    transport.send([refresh_request(1)])
    rabbitmq.ctl("close_all_connections", "test: simulate a dropped connection")
    tap = EventTap(rabbitmq.url, exchange)
    try:
        transport.send([refresh_request(2)])
        assert [event.body["data"]["connectionId"] for event in tap.drain()] == ["conn-2"]
    finally:
        tap.close()
    assert transport.connections_opened == 2


def test_concurrent_invocations_share_one_connection_safely(transport, event_tap):
    def publish_many(worker: int) -> None:
        for n in range(50):
            transport.send([refresh_request(worker * 1000 + n)])

    threads = [threading.Thread(target=publish_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = [event.body["data"]["connectionId"] for event in event_tap.drain()]
    assert sorted(received) == sorted(f"conn-{w * 1000 + n}" for w in range(8) for n in range(50))
    assert transport.connections_opened == 1


def test_unreachable_broker_raises_instead_of_hanging(exchange):
    transport = RabbitMqTransport("amqp://guest:guest@127.0.0.1:1/%2F", exchange)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        transport.send([refresh_request(1)])
