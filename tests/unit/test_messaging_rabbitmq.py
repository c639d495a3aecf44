"""RabbitMQ transport without a broker: an address nobody listens on fails at once. Against a real
RabbitMQ node: tests/integration/test_messaging_rabbitmq.py."""

import pika
import pytest

from shared.messaging import RabbitMqTransport
from tests.support.helpers import numbered_refresh_request


def test_unreachable_broker_raises_instead_of_hanging(exchange):
    transport = RabbitMqTransport("amqp://guest:guest@127.0.0.1:1/%2F", exchange)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        transport.send([numbered_refresh_request(1)])
