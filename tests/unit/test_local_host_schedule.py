"""The local host's schedule without a broker: a message body's notBefore, and where a message due at a
given time waits (held, or in which delay queue). With RabbitMQ: tests/e2e/test_scheduled_delivery.py."""

import random
import time

import pytest

from localdev.scheduled_delivery import DELAY_QUEUE_MAX_S, DeliveryScheduler, not_before_ms

NOT_BEFORE_MS = 1796140800123  # 2026-12-01T16:00:00.123Z


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"data":{"notBefore":"2026-12-01T16:00:00.123Z"}}', NOT_BEFORE_MS),
        (b'{"data":{"notBefore":"2026-12-01T16:00:00.1231Z"}}', NOT_BEFORE_MS + 1),  # rounded up: never early
        (b'{"data":{"notBefore":"2026-12-01T17:00:00.123+01:00"}}', NOT_BEFORE_MS),
        (b'{"data":{"connectionId":"c-1"}}', None),
        (b'{"data":{"notBefore":null}}', None),
        (b'{"data":{"notBefore":"soon"}}', None),
        (b'{"data":{"notBefore":1796140800123}}', None),
        (b'{"data":["notBefore"]}', None),
        (b'["notBefore"]', None),
        (b'{"notBefore":"2026-12-01T16:00:00.123Z"}', None),  # not in data
        (b'not json "notBefore"', None),
        (b'\xff"notBefore"', None),
        (b"[" * 100_000 + b'"notBefore"', None),
    ],
)
def test_not_before_of_a_message_body(body, expected):
    assert not_before_ms(body) == expected


def schedule(hold_max_s: float) -> DeliveryScheduler:
    return DeliveryScheduler(None, "p.refresh-requested", hold_max_s=hold_max_s)  # type: ignore[arg-type]


def test_delay_queues_are_powers_of_two_from_what_a_hop_can_need():
    default = schedule(600)
    assert default.delays_s == [2**k for k in range(8, 18)]  # 256 s .. ~36 h
    assert default.delays_s[-1] == DELAY_QUEUE_MAX_S
    assert schedule(0.6).delays_s[0] == 1
    assert default.delay_queue(256) == "p.refresh-requested.scheduled.delay-256s"


@pytest.mark.parametrize(
    ("hold_max_s", "due_in_s", "waits_in"),
    [
        (600, 0, "p.refresh-requested.scheduled"),
        (600, 599, "p.refresh-requested.scheduled"),
        (600, 660, "p.refresh-requested.scheduled.delay-256s"),
        (600, 3600, "p.refresh-requested.scheduled.delay-2048s"),
        (600, 30 * 86400, "p.refresh-requested.scheduled.delay-131072s"),
        (0.6, 0.5, "p.refresh-requested.scheduled"),
        (0.6, 1.0, "p.refresh-requested.scheduled"),  # too far to hold, too near for the shortest delay queue
        (0.6, 3.6, "p.refresh-requested.scheduled.delay-2s"),
    ],
)
def test_where_a_message_waits(hold_max_s, due_in_s, waits_in):
    assert schedule(hold_max_s)._route(time.time() * 1000 + due_in_s * 1000) == waits_in


def test_a_hop_never_takes_a_message_past_its_time_and_it_is_held_within_the_hold_limit_in_the_end():
    rng = random.Random(7)
    scheduled = schedule(600)
    for _ in range(2000):
        remaining_s = rng.uniform(0, 30 * 86400)
        hops = 0
        while (queue := scheduled._route(time.time() * 1000 + remaining_s * 1000)) != scheduled.queue:
            remaining_s -= int(queue.rsplit("-", 1)[1].removesuffix("s"))
            assert remaining_s >= 300 - 0.1  # at least hold_max / 2 left after a hop
            hops += 1
        assert remaining_s <= 600 + 0.1 and hops <= 35
