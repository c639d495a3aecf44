"""Queues bound to every routing key of a test's exchange: they see every event the app publishes.

``EventTap`` is an exclusive queue (the ``event_tap`` fixture); ``DurableTap`` survives the broker
restarting and reconnects on its own (the ``tap`` fixture, for the fault tests)."""

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika

from shared.events import CloudEvent


@dataclass
class CapturedEvent:
    routing_key: str
    properties: Any
    body: dict


def of_type(events: list[CapturedEvent], *types: str) -> list[dict]:
    """The bodies of the captured events of these types."""
    return [event.body for event in events if event.routing_key in types]


class EventTap:
    """An exclusive queue bound to every routing key of the exchange: sees every published event."""

    def __init__(self, url: str, exchange_name: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange_name, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, exchange_name, routing_key="#")

    def drain(self) -> list[CapturedEvent]:
        events = []
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return events
            events.append(CapturedEvent(method.routing_key, properties, json.loads(body)))

    def of_type(self, event_type: str) -> list[dict]:
        return [event.body for event in self.drain() if event.routing_key == event_type]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class DurableTap:
    """A durable queue bound to every routing key of the exchange. Unlike an exclusive queue it
    survives the broker restarting (the events are persistent), and it reconnects on its own."""

    def __init__(self, url: str, exchange: str):
        self.url = url
        self.exchange = exchange
        self.queue = f"tap.{uuid.uuid4().hex[:10]}"
        self.events: list[CapturedEvent] = []  # everything drained so far
        self._connection: Any = None
        self._channel: Any = None
        self._open()

    def _open(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            pika_logger = logging.getLogger("pika")
            level = pika_logger.level
            pika_logger.setLevel(logging.CRITICAL)  # refused while the broker restarts: expected, not news
            try:
                self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
            finally:
                pika_logger.setLevel(level)
            self._channel = self._connection.channel()
            self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            self._channel.queue_declare(self.queue, durable=True)
            self._channel.queue_bind(self.queue, self.exchange, routing_key="#")
        return self._channel

    def drain(self, timeout: float = 30) -> list[CapturedEvent]:
        """The events that arrived since the last drain (reconnecting while the broker restarts)."""
        deadline = time.monotonic() + timeout
        drained: list[CapturedEvent] = []
        while True:
            try:
                channel = self._open()
                while True:
                    method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                    if method is None:
                        self.events.extend(drained)
                        return drained
                    drained.append(CapturedEvent(method.routing_key, properties, json.loads(body)))
            except pika.exceptions.AMQPError:
                self._connection = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the broker is restarting

    def everything(self) -> list[CapturedEvent]:
        """Every event captured so far (draining what arrived meanwhile)."""
        self.drain()
        return self.events

    def wait_for(self, predicate: Callable[[list[CapturedEvent]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if predicate(self.events):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        try:
            self._open().queue_delete(self.queue)
            self._connection.close()
        except pika.exceptions.AMQPError:
            pass


def publish(url: str, exchange: str, *events: CloudEvent) -> None:
    """As the app's RabbitMQ transport (and the platform bridge) sends them: to the exchange, routing key = type,
    message id = event id, persistent, confirmed, routed."""
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for event in events:
            properties = pika.BasicProperties(
                message_id=event.id,
                content_type="application/cloudevents+json",
                type=event.type,
                delivery_mode=pika.DeliveryMode.Persistent,
            )
            channel.basic_publish(exchange, event.type, event.to_json(), properties, mandatory=True)
