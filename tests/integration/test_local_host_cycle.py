"""The local host's `run --once` summary counts every outcome of the cycle, once per event id, however many
there are: outcomes are consumed from the cycle queue in windows (COUNT_PREFETCH), not fetched one by one."""

from __future__ import annotations

import json
import uuid

import pika

from localdev.local_host import COUNT_PREFETCH, CycleSummary, LocalHost
from shared.events import REFRESH_FAILED, REFRESHED
from shared.settings import load_settings


def publish(channel, exchange: str, event_type: str, event_id: str, data: dict) -> None:
    body = json.dumps({"id": event_id, "type": event_type, "data": data}).encode()
    channel.basic_publish(
        exchange, event_type, body, pika.BasicProperties(message_id=event_id, type=event_type, delivery_mode=2)
    )


def test_every_outcome_beyond_one_window_is_counted_once(app_env, rabbitmq):
    host = LocalHost(load_settings(), queue_prefix=f"cycle-{uuid.uuid4().hex[:8]}.")
    channel = host.connect()
    cycle_queue = host._declare_cycle_queue()
    refreshed = 2 * COUNT_PREFETCH + 37
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        publisher = connection.channel()
        publisher.confirm_delivery()
        exchange = app_env["RABBITMQ_EXCHANGE"]
        for n in range(refreshed):
            publish(publisher, exchange, REFRESHED, f"ok-{n}", {"connectionId": f"c-{n}"})
        for n in range(3):
            publish(publisher, exchange, REFRESH_FAILED, f"failed-{n}", {"connectionId": f"f-{n}"})
        for n in range(0, refreshed, 10):  # at-least-once: the same outcome published again
            publish(publisher, exchange, REFRESHED, f"ok-{n}", {"connectionId": f"c-{n}"})
    summary = CycleSummary()
    try:
        host._count_outcomes(cycle_queue, summary, set())
        left = channel.queue_declare(cycle_queue, passive=True).method.message_count
    finally:
        channel.queue_delete(cycle_queue)
        host.close()
    assert (summary.refreshed, summary.failed, left) == (refreshed, 3, 0)
    assert sorted(failure["connectionId"] for failure in summary.failures) == ["f-0", "f-1", "f-2"]
