"""A local stand-in for the Functions host, driven by RabbitMQ.

It loads the three function folders the way the Functions host does (their `function.json` and
`main()`), declares one RabbitMQ queue per Service Bus trigger, bound to the platform exchange with
the trigger's queue name as routing key (= the event type), and invokes `main()` with real
`azure.functions` trigger objects. A message whose function raises is put back and retried; after
`max_deliveries` attempts RabbitMQ dead-letters it to `<queue>.dead-letter`, where it can be
inspected. Queues are quorum queues: the broker counts deliveries (`x-delivery-count`) and applies
the limit, like Service Bus's MaxDeliveryCount.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions.servicebus as func_servicebus
import pika
from azure.functions.timer import TimerRequest

from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESHED
from shared.settings import Settings

logger = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parent.parent
QUEUE_PREFIX = "integration-token-refresh."


@dataclass(frozen=True)
class QueueFunction:
    """A Service-Bus-triggered function folder and the local queue that drives it."""

    name: str
    event_type: str
    main: Callable[[Any], Any]
    queue: str

    @property
    def dead_letter_queue(self) -> str:
        return self.queue + ".dead-letter"


@dataclass
class CycleSummary:
    checks: int = 0
    found: int = 0
    refreshed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def load_function_app(
    app_root: Path = APP_ROOT, queue_prefix: str = QUEUE_PREFIX
) -> tuple[Callable[[Any], Any], list[QueueFunction]]:
    """Import every function folder; return the timer's main and the queue-triggered functions."""
    timer_main = None
    queue_functions = []
    for manifest in sorted(app_root.glob("*/function.json")):
        bindings = json.loads(manifest.read_text())["bindings"]
        trigger = next(binding for binding in bindings if binding["type"].endswith("Trigger"))
        module = importlib.import_module(manifest.parent.name)
        if trigger["type"] == "timerTrigger":
            timer_main = module.main
        elif trigger["type"] == "serviceBusTrigger":
            event_type = trigger["queueName"]  # Service Bus queue name = event type = routing key
            queue = queue_prefix + event_type.removeprefix("integration.token.")
            queue_functions.append(QueueFunction(manifest.parent.name, event_type, module.main, queue))
    if timer_main is None or not queue_functions:
        raise RuntimeError(f"no timer and queue functions found under {app_root}")
    return timer_main, queue_functions


def trigger_message(body: bytes, properties: pika.BasicProperties) -> func_servicebus.ServiceBusMessage:
    """The trigger object the Functions host would pass for this message."""
    headers = properties.headers or {}
    return func_servicebus.ServiceBusMessage(
        body=body,
        message_id=properties.message_id or "",
        content_type=properties.content_type,
        delivery_count=int(headers.get("x-delivery-count", 0)) + 1,
        application_properties={"type": properties.type} if properties.type else {},
        user_properties={},
    )


class LocalHost:
    def __init__(self, settings: Settings, queue_prefix: str = QUEUE_PREFIX, app_root: Path = APP_ROOT):
        if settings.rabbitmq_url is None:
            raise SystemExit("The local host needs RABBITMQ_URL: RabbitMQ is its transport.")
        self.settings = settings
        # The functions read the same setting to know their last delivery, as with Service Bus.
        self.max_deliveries = settings.max_delivery_count
        self.timer_main, self.functions = load_function_app(app_root, queue_prefix)
        self._by_queue = {function.queue: function for function in self.functions}
        self._connection: Any = None
        self._channel: Any = None
        self._stop = threading.Event()

    # Topology -----------------------------------------------------------------------------------

    def connect(self) -> Any:
        parameters = pika.URLParameters(self.settings.rabbitmq_url.get_secret_value())
        self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()
        self._channel.basic_qos(prefetch_count=1)
        declare_topology(self._channel, self.settings.rabbitmq_exchange, self.functions, self.max_deliveries)
        return self._channel

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        self._connection = self._channel = None

    # Invocation ---------------------------------------------------------------------------------

    def invoke(self, queue: str, method: Any, properties: Any, body: bytes) -> bool:
        """Run the queue's function on one message; ack on success, requeue (or dead-letter) on error."""
        function = self._by_queue[queue]
        message = trigger_message(body, properties)
        try:
            function.main(message)
        except Exception as error:
            last = message.delivery_count >= self.max_deliveries
            reason = f"{error.__class__.__name__}: {error}"[:1000]
            logger.error(
                "Function %s failed on message %s (delivery %d of %d): %s%s",
                function.name,
                message.message_id,
                message.delivery_count,
                self.max_deliveries,
                reason,
                f"; dead-lettering to {function.dead_letter_queue}" if last else "; will retry",
            )
            logger.debug("function failure", exc_info=True)
            if last:
                self._dead_letter(function, properties, body, reason, message.delivery_count)
                self._channel.basic_ack(method.delivery_tag)
            else:
                # Like a Service Bus abandon: redelivered at once (the functions back off inside an invocation).
                self._channel.basic_nack(method.delivery_tag, requeue=True)
            return False
        self._channel.basic_ack(method.delivery_tag)
        return True

    def _dead_letter(self, function: QueueFunction, properties: Any, body: bytes, reason: str, deliveries: int) -> None:
        """Park the message with the reason, like Service Bus's DeadLetterReason/ErrorDescription."""
        headers = dict(properties.headers or {}) | {
            "x-dead-letter-reason": "MaxDeliveryCountExceeded",
            "x-dead-letter-error-description": reason,
            "x-source-queue": function.queue,
            "x-delivery-count": deliveries,
        }
        self._channel.basic_publish(
            "",
            function.dead_letter_queue,
            body,
            pika.BasicProperties(
                content_type=properties.content_type,
                message_id=properties.message_id,
                type=properties.type,
                delivery_mode=pika.DeliveryMode.Persistent,
                headers=headers,
            ),
        )

    def tick_timer(self) -> None:
        self.timer_main(TimerRequest(past_due=False))

    # Modes --------------------------------------------------------------------------------------

    def run_once(self) -> CycleSummary:
        """One full cycle: timer, every check message, every refresh request, every outcome counted."""
        channel = self._channel or self.connect()
        outcomes = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for event_type in (REFRESHED, REFRESH_FAILED):
            channel.queue_bind(outcomes, self.settings.rabbitmq_exchange, routing_key=event_type)
        dead_letters_before = self._dead_letter_count()

        summary = CycleSummary()
        self.tick_timer()
        processed = True
        while processed:
            processed = False
            for function in self.functions:  # check-expiring first: it feeds refresh-requested
                while (delivery := channel.basic_get(function.queue)) != (None, None, None):
                    method, properties, body = delivery
                    if self.invoke(function.queue, method, properties, body):
                        if function.event_type == CHECK_EXPIRING:
                            summary.checks += 1
                        else:
                            summary.found += 1
                    processed = True

        while (delivery := channel.basic_get(outcomes, auto_ack=True)) != (None, None, None):
            _, properties, body = delivery
            if properties.type == REFRESHED:
                summary.refreshed += 1
            else:
                summary.failed += 1
                summary.failures.append(json.loads(body)["data"])
        summary.dead_lettered = self._dead_letter_count() - dead_letters_before
        return summary

    def run_forever(self, tick_seconds: float | None = None) -> None:
        """Consume until stop() or Ctrl-C; tick the timer so TOKEN_REFRESH_INTERVAL_MS sets the cadence."""
        channel = self._channel or self.connect()
        tick = tick_seconds or max(1.0, min(60.0, self.settings.interval_ms / 10_000))
        for function in self.functions:
            channel.basic_consume(
                function.queue,
                lambda ch, method, properties, body, queue=function.queue: self.invoke(queue, method, properties, body),
            )

        def on_tick() -> None:
            self.tick_timer()
            self._connection.call_later(tick, on_tick)

        self._connection.call_later(0, on_tick)
        logger.info(
            "Local host running: queues %s, timer tick %.1f s (Ctrl-C stops)",
            ", ".join(f.queue for f in self.functions),
            tick,
        )
        try:
            while not self._stop.is_set():
                self._connection.process_data_events(time_limit=0.5)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def _dead_letter_count(self) -> int:
        return sum(
            self._channel.queue_declare(f.dead_letter_queue, passive=True).method.message_count for f in self.functions
        )


def declare_topology(channel: Any, exchange: str, functions: list[QueueFunction], max_deliveries: int) -> None:
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    for function in functions:
        channel.queue_declare(function.dead_letter_queue, durable=True)
        channel.queue_declare(
            function.queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # Safety net for a host that dies mid-message over and over; failures dead-letter in invoke().
                "x-delivery-limit": max_deliveries,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": function.dead_letter_queue,
            },
        )
        channel.queue_bind(function.queue, exchange, routing_key=function.event_type)
