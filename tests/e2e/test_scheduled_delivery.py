"""Scheduled refresh requests on the local host: a `refresh-requested` event whose `notBefore` is in the
future reaches the refresh function at that time, not before (Service Bus scheduled messages in Azure),
and the wait survives the host being killed. Real RabbitMQ, Cosmos-compatible server and stand-in
manager; the host in process (`run` in a thread, `run --once`) or as `python -m localdev run`, SIGKILLed.

The time of a refresh is when the stand-in manager got the call: after the host handed the request to
the function, which re-read the connection and claimed the request first."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pika
import pytest

from localdev.local_host import LocalHost
from localdev.scheduled_delivery import HOLD_MAX_S
from localdev.stand_in_manager import Answer, Call
from shared import runtime
from shared.events import REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED, CloudEvent, RefreshRequestedData, make_event
from shared.settings import load_settings
from shared.times import format_time, parse_time, utc_now
from tests.support.event_taps import publish
from tests.support.host_process import Host

EARLY_S = 0.005  # a refresh may not happen earlier than its notBefore (ms precision) minus this
# ... nor later than this after it. Idle, the host calls within ~35 ms (p50; docs/running-locally.md); the
# bound leaves room for a loaded CI machine: what the tests pin is "never early" and "at its time, not later".
LATE_S = 1.0
TOKEN_LIFETIME = timedelta(hours=3)


# Helpers ------------------------------------------------------------------------------------------


class CallClock:
    """The stand-in manager's script: answers (200 unless told otherwise) and records when each call came."""

    def __init__(self, answer: Answer | None = None):
        self.answer = answer or Answer(200)
        self.times: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __call__(self, call: Call) -> Answer:
        with self._lock:
            self.times.setdefault(call.connection_id or "", []).append(time.time())
        return self.answer

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(len(t) for t in self.times.values()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(len(t) for t in self.times.values()) >= count, f"calls so far: {self.times}"

    def order(self) -> list[str]:
        return [c for c, _ in sorted(((c, t[0]) for c, t in self.times.items()), key=lambda item: item[1])]


def seed(container, *connection_ids: str) -> dict[str, datetime]:
    """Connections whose token expires in two hours (not due for a check), by id: their expiresAt."""
    expires_at = (utc_now() + timedelta(hours=2)).replace(microsecond=0)
    for connection_id in connection_ids:
        container.upsert_item(
            {
                "id": connection_id,
                "tenantId": "t-1",
                "integrationId": "zoom",
                "status": "active",
                "oauth": {"accessToken": "at", "refreshToken": "rt", "expiresAt": format_time(expires_at)},
            }
        )
    return dict.fromkeys(connection_ids, expires_at)


def request(connection_id: str, expires_at: datetime, in_s: float | None) -> CloudEvent:
    """A refresh request for the connection, due `in_s` seconds from now (None: no notBefore)."""
    now = utc_now()
    not_before = None if in_s is None else now + timedelta(seconds=in_s)
    data = RefreshRequestedData(
        connection_id=connection_id,
        integration_id="zoom",
        tenant_id="t-1",
        expires_at=expires_at,
        requested_at=now,
        not_before=not_before,
    )
    return make_event(data)


def not_before_s(event: CloudEvent) -> float:
    """The event's notBefore as it is on the wire (milliseconds), in epoch seconds."""
    return parse_time(event.data["notBefore"]).timestamp()


class Queues:
    """Looks at the host's queues from outside (a connection of the test's own)."""

    def __init__(self, url: str, prefix: str):
        # A look at a queue that is not declared yet closes the channel; pika warns each time.
        self._pika_channel_log = logging.getLogger("pika.channel")
        self._pika_level = self._pika_channel_log.level
        self._pika_channel_log.setLevel(logging.ERROR)
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.refresh = f"{prefix}refresh-requested"
        self.scheduled = f"{self.refresh}.scheduled"
        self.due = f"{self.refresh}.due"  # where the schedule delivers (consumed ahead of the refresh queue)

    def state(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers), None when the queue does not exist (yet)."""
        try:
            method = self.channel.queue_declare(name, passive=True).method
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return None
        return method.message_count, method.consumer_count

    def wait(self, name: str, condition, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not ((state := self.state(name)) is not None and condition(*state)):
            assert time.monotonic() < deadline, f"{name}: {state}"
            time.sleep(0.02)

    def wait_until_consumed(self, consumers: int = 1) -> None:
        """The host consumes its refresh queue and its releasing thread the scheduled queue."""
        self.wait(self.refresh, lambda _, n: n >= 1)
        self.wait(self.scheduled, lambda _, n: n == consumers)

    def close(self) -> None:
        self._pika_channel_log.setLevel(self._pika_level)
        with contextlib.suppress(Exception):
            self.connection.close()


@pytest.fixture
def scheduled_env(app_env, monkeypatch, cosmos_container, manager):
    """The services of app_env; no check-expiring events (the timer is off): only the tests' requests."""
    monkeypatch.setenv("TOKEN_REFRESH_ENABLED", "false")
    runtime.reset()
    manager.container = cosmos_container
    manager.token_lifetime = TOKEN_LIFETIME
    return app_env | {"TOKEN_REFRESH_ENABLED": "false"}


@contextlib.contextmanager
def running_host(rabbitmq, hold_max_s: float = HOLD_MAX_S) -> Iterator[tuple[LocalHost, Queues]]:
    """`run` in a thread of this process, on queues of its own, until the block ends."""
    prefix = f"scheduled-{uuid.uuid4().hex[:8]}."
    host = LocalHost(load_settings(), queue_prefix=prefix, schedule_hold_max_s=hold_max_s)
    thread = threading.Thread(target=host.run_forever, kwargs={"tick_seconds": 3600}, daemon=True)
    thread.start()
    queues = Queues(rabbitmq.url, prefix)
    try:
        queues.wait_until_consumed()
        yield host, queues
    finally:
        host.stop()
        thread.join(20)
        queues.close()
        runtime.reset()
    assert not thread.is_alive()


def warm_up(rabbitmq, exchange: str, container, clock: CallClock) -> None:
    """One refresh at once, so that the host's first refresh, which builds the process's clients (Cosmos,
    the state container, HTTP: ~0.5 s), is not one whose time is measured."""
    expiries = seed(container, "c-warm-up")
    publish(rabbitmq.url, exchange, request("c-warm-up", expiries["c-warm-up"], None))
    deadline = time.monotonic() + 10
    while "c-warm-up" not in clock.times:
        assert time.monotonic() < deadline, "no warm-up call"
        time.sleep(0.01)
    del clock.times["c-warm-up"]


def assert_on_time(clock: CallClock, events: list[CloudEvent], late_s: float = LATE_S) -> None:
    for event in events:
        [called] = clock.times[event.data["connectionId"]]  # exactly once
        due = not_before_s(event)
        assert called >= due - EARLY_S, f"{event.data['connectionId']}: {due - called:.3f} s early"
        assert called <= due + late_s, f"{event.data['connectionId']}: {called - due:.3f} s late"


# Tests --------------------------------------------------------------------------------------------


def test_a_request_due_later_is_refreshed_at_its_time_and_one_without_not_before_at_once(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager, event_tap
):
    expiries = seed(cosmos_container, "c-later", "c-now")
    manager.script = clock = CallClock()
    with running_host(rabbitmq):
        warm_up(rabbitmq, exchange, cosmos_container, clock)
        later = request("c-later", expiries["c-later"], in_s=1.5)
        now = request("c-now", expiries["c-now"], in_s=None)
        published_at = time.time()
        publish(rabbitmq.url, exchange, later, now)
        clock.wait_for(1, timeout=5)
        assert list(clock.times) == ["c-now"]
        assert clock.times["c-now"][0] - published_at < LATE_S  # at once
        clock.wait_for(2, timeout=5)
        assert_on_time(clock, [later])
        time.sleep(0.1)
    refreshed = [e.body["data"]["connectionId"] for e in event_tap.drain() if e.routing_key == REFRESHED]
    assert sorted(refreshed) == ["c-later", "c-now", "c-warm-up"]


def test_requests_published_out_of_order_are_refreshed_in_not_before_order_at_their_times(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager
):
    offsets = {"c-a": 1.9, "c-b": 0.7, "c-c": 2.5, "c-d": 1.3, "c-e": 0.3}  # 0.6 s apart: more than any jitter
    expiries = seed(cosmos_container, *offsets)
    manager.script = clock = CallClock()
    with running_host(rabbitmq):
        warm_up(rabbitmq, exchange, cosmos_container, clock)
        events = [request(c, expiries[c], in_s=offset) for c, offset in offsets.items()]
        publish(rabbitmq.url, exchange, *events)
        clock.wait_for(len(events), timeout=6)
        time.sleep(0.1)
    assert clock.order() == sorted(offsets, key=offsets.get)
    assert_on_time(clock, events)


def test_requests_waiting_in_the_schedule_survive_a_killed_host_and_are_refreshed_once_at_their_time(
    scheduled_env, fault_env, rabbitmq, exchange, cosmos_container, manager, tmp_path
):
    env = fault_env | {"TOKEN_REFRESH_ENABLED": "false"}
    offsets = {"c-1": 3.5, "c-2": 4.1, "c-3": 3.8, "c-4": 4.4}
    expiries = seed(cosmos_container, *offsets)
    manager.script = clock = CallClock()
    queues = Queues(rabbitmq.url, env["FAULT_QUEUE_PREFIX"])
    first = Host(env, tmp_path)
    second = None
    try:
        queues.wait_until_consumed()
        events = [request(c, expiries[c], in_s=offset) for c, offset in offsets.items()]
        publish(rabbitmq.url, exchange, *events)
        # All moved from the refresh queue to the schedule, held there (unacknowledged) by the host.
        queues.wait(queues.refresh, lambda ready, _: ready == 0)
        queues.wait(queues.scheduled, lambda ready, _: ready == 0)
        time.sleep(0.2)
        assert clock.times == {}
        first.kill()  # SIGKILL: nothing is given back in order; the broker notices the closed connection
        queues.wait(queues.scheduled, lambda ready, consumers: ready == len(events) and consumers == 0)

        second = Host(env, tmp_path)
        queues.wait_until_consumed()
        warm_up(rabbitmq, exchange, cosmos_container, clock)
        ready_at = time.time()
        clock.wait_for(len(events), timeout=15)
        time.sleep(0.3)  # nothing more comes
        assert second.process.poll() is None, second.output()[-3000:]
        assert second.interrupt() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
        queues.close()
    assert sorted(clock.times) == sorted(offsets)
    on_time = 0
    for event in events:
        [called] = clock.times[event.data["connectionId"]]  # exactly once
        due = not_before_s(event)
        assert called >= due - EARLY_S, f"{event.data['connectionId']}: {due - called:.3f} s early"
        if due > ready_at + 0.05:  # due once the new host was up: on time (else as soon as it was up)
            on_time += 1
            assert called <= due + LATE_S, f"{event.data['connectionId']}: {called - due:.3f} s late"
    assert on_time >= 1, (
        f"the new host was ready {ready_at - min(map(not_before_s, events)):.2f} s after the first was due"
    )
    output = second.output()
    assert f"{len(events)} scheduled deliveries waiting" in output, output[-3000:]
    assert "Traceback" not in output and "Traceback" not in first.output()


def test_a_request_due_beyond_the_hold_limit_waits_in_delay_queues_and_is_still_refreshed_at_its_time(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager, caplog
):
    """HOLD_MAX 0.6 s: a request due in 3.6 s waits 2 s in one delay queue, 1 s in another, then is held."""
    caplog.set_level(logging.DEBUG, logger="localdev.local_host")
    caplog.set_level(logging.DEBUG, logger="localdev.scheduled_delivery")
    expiries = seed(cosmos_container, "c-far")
    manager.script = clock = CallClock()
    with running_host(rabbitmq, hold_max_s=0.6) as (host, queues):
        warm_up(rabbitmq, exchange, cosmos_container, clock)
        far = request("c-far", expiries["c-far"], in_s=3.6)
        publish(rabbitmq.url, exchange, far)
        two_s = host.schedule.delay_queue(2)
        queues.wait(two_s, lambda ready, _: ready == 1, timeout=1)  # in the 2 s delay queue
        assert queues.state(host.schedule.queue) == (0, 1)  # nothing held
        time.sleep(0.5)
        assert queues.state(two_s) == (1, 0) and clock.times == {}
        clock.wait_for(1, timeout=6)
        time.sleep(0.1)
        assert_on_time(clock, [far])
        for seconds in (1, 2):
            assert queues.state(host.schedule.delay_queue(seconds))[0] == 0
    hops = [r.getMessage() for r in caplog.records if "delay-" in r.getMessage() and far.id in r.getMessage()]
    assert [re.search(r"delay-(\d+)s", hop).group(1) for hop in hops] == ["2", "1"], hops


def test_run_once_waits_for_scheduled_requests_and_counts_them(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager
):
    expiries = seed(cosmos_container, "c-1", "c-2", "c-3")
    manager.script = clock = CallClock()
    host = LocalHost(load_settings(), queue_prefix=f"scheduled-{uuid.uuid4().hex[:8]}.")
    try:
        host.connect()  # its queues, bound to the exchange
        # c-3 first, at once: its refresh builds the process's clients (~0.5 s) before c-1 is due.
        events = [request("c-1", expiries["c-1"], 1.5), request("c-2", expiries["c-2"], 2.0)]
        publish(rabbitmq.url, exchange, *events, request("c-3", expiries["c-3"], None))
        summary = host.run_once()
        returned_at = time.time()
    finally:
        host.close()
        runtime.reset()
    assert (summary.found, summary.refreshed, summary.failed, summary.dead_lettered) == (3, 3, 0, 0)
    assert sorted(clock.times) == ["c-1", "c-2", "c-3"]
    assert returned_at >= max(t for [t] in clock.times.values())
    assert_on_time(clock, events)


def test_run_once_without_scheduled_requests_is_not_slower(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager
):
    expiries = seed(cosmos_container, "c-1")
    manager.script = clock = CallClock()
    host = LocalHost(load_settings(), queue_prefix=f"scheduled-{uuid.uuid4().hex[:8]}.")
    try:
        host.connect()
        publish(rabbitmq.url, exchange, request("c-1", expiries["c-1"], None))
        started = time.monotonic()
        summary = host.run_once()
        took = time.monotonic() - started
    finally:
        host.close()
        runtime.reset()
    assert (summary.found, summary.refreshed) == (1, 1)
    assert list(clock.times) == ["c-1"]
    assert took < 1.5, f"run_once took {took:.2f} s"


def test_a_scheduled_request_keeps_its_deliveries_transient_failures_retry_and_report_as_without_schedule(
    scheduled_env, rabbitmq, exchange, cosmos_container, manager, event_tap
):
    """Being scheduled uses none of a request's deliveries, and the released copy is not scheduled again:
    503 to every call → 2 calls x 3 deliveries (TOKEN_REFRESH_MAX_DELIVERY_COUNT, retries included), then
    refresh.failed; the first call not before notBefore."""
    expiries = seed(cosmos_container, "c-1")
    manager.script = clock = CallClock(Answer(503))
    host = LocalHost(load_settings(), queue_prefix=f"scheduled-{uuid.uuid4().hex[:8]}.")
    try:
        host.connect()
        event = request("c-1", expiries["c-1"], 0.5)
        publish(rabbitmq.url, exchange, event)
        summary = host.run_once()
    finally:
        host.close()
        runtime.reset()
    assert (summary.found, summary.refreshed, summary.failed, summary.dead_lettered) == (1, 0, 1, 0)
    calls = clock.times["c-1"]
    assert len(calls) == 6
    assert calls[0] >= not_before_s(event) - EARLY_S
    [failed] = [e.body for e in event_tap.drain() if e.routing_key == REFRESH_FAILED]
    assert (failed["data"]["retryable"], failed["data"]["attempts"]) == (True, 6)


def test_the_due_queue_gets_a_released_request_with_its_properties_and_no_schedule_headers(
    scheduled_env, rabbitmq, exchange, cosmos_container
):
    """What the schedule hands on: same body, message id, type and content type, persistent, marked as
    released (never deferred again), without the broker's dead-lettering or delivery-count headers."""
    expiries = seed(cosmos_container, "c-1")
    host = LocalHost(load_settings(), queue_prefix=f"scheduled-{uuid.uuid4().hex[:8]}.", schedule_hold_max_s=0.2)
    queues = Queues(rabbitmq.url, host.queue_prefix)
    try:
        host.connect()
        host.schedule.start()  # the schedule alone: nothing consumes the refresh queue
        queues.wait(queues.scheduled, lambda _, consumers: consumers == 1)
        event = request("c-1", expiries["c-1"], 1.3)  # through the 1 s delay queue (x-death on the way back)
        publish(rabbitmq.url, exchange, event)
        method, properties, body = host._channel.basic_get(queues.refresh)
        assert host.invoke(queues.refresh, method, properties, body) is False  # deferred, not run
        deadline = time.monotonic() + 5
        while (delivery := queues.channel.basic_get(queues.due, auto_ack=True))[0] is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        released_at = time.time()
    finally:
        host.close()
        queues.close()
        runtime.reset()
    _, properties, body = delivery
    assert body == event.to_json()
    assert (properties.message_id, properties.type, properties.content_type) == (
        event.id,
        REFRESH_REQUESTED,
        "application/cloudevents+json",
    )
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    # Its first delivery from the refresh queue (the quorum queue counts from 0); no x-death, no due time.
    assert set(properties.headers) - {"x-delivery-count"} == {"x-released-at"}
    assert properties.headers.get("x-delivery-count", 0) == 0
    assert not_before_s(event) - EARLY_S <= released_at <= not_before_s(event) + LATE_S
