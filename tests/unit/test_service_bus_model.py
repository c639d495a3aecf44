"""The Service Bus model (localdev/service_bus_model.py): what the broker does with sends, locks, deliveries,
sessions, schedules and time to live, and what the Functions trigger's processor makes of it, on a VirtualClock.
Each test states a rule of Microsoft's documentation that the tests and tooling built on the model rely on."""

import json
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from azure.servicebus import ServiceBusMessage

from localdev.service_bus_model import (
    QUEUES_FILE,
    Delivery,
    MessageLockLostError,
    MessageRefusedError,
    ModelMessage,
    ProcessorOptions,
    QueueProperties,
    ServiceBusModel,
    SessionNotHeldError,
    VirtualClock,
    parse_timespan,
    queue_properties,
    simulate_processor,
)

ROOT = QUEUES_FILE.parents[1]
REFRESH = "integration.token.refresh-requested"
QUEUE = "q"
SESSIONS = "q.sessions"
WINDOW = timedelta(minutes=10)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def model_of(clock: VirtualClock, **properties) -> ServiceBusModel:
    """A model with one queue QUEUE of the given properties, and a session-enabled twin SESSIONS."""
    plain = QueueProperties(name=QUEUE, **properties)
    return ServiceBusModel([plain, replace(plain, name=SESSIONS, requires_session=True)], clock.now)


def message(message_id: str = "m-1", session_id: str | None = None, **fields) -> ModelMessage:
    return ModelMessage(body=b"{}", message_id=message_id, session_id=session_id, **fields)


def receive(model: ServiceBusModel, queue: str = QUEUE) -> Delivery:
    delivery = model.receive(queue)
    assert delivery is not None
    return delivery


# ---------------------------------------------------------------------------------------------- queue properties


def test_queue_properties_reads_the_repos_queue_file():
    queues = queue_properties()
    assert set(queues) == set(json.loads(QUEUES_FILE.read_text("utf-8"))["queues"])
    refresh = queues[REFRESH]
    assert refresh.duplicate_detection_window == timedelta(hours=2)
    assert refresh.max_delivery_count == 10
    assert refresh.lock_duration == timedelta(minutes=5)
    assert refresh.dead_lettering_on_message_expiration
    assert not refresh.requires_session
    assert queues["integration.token.check-expiring"].duplicate_detection_window is None  # off in the file
    assert queues["integration.token.refreshed"] == QueueProperties(name="integration.token.refreshed")


def test_queue_properties_overrides_replace_the_files_values_of_one_queue():
    queues = queue_properties({REFRESH: {"maxDeliveryCount": 3, "duplicateDetectionHistoryTimeWindow": "PT10M"}})
    assert queues[REFRESH].max_delivery_count == 3
    assert queues[REFRESH].duplicate_detection_window == timedelta(minutes=10)
    assert queues[REFRESH].lock_duration == timedelta(minutes=5)  # untouched
    assert queues["integration.token.check-expiring"].max_delivery_count == 10
    assert (
        queue_properties({REFRESH: {"requiresDuplicateDetection": False}})[REFRESH].duplicate_detection_window is None
    )


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({REFRESH: {"maxDeliveryCounts": 3}}, ValueError),  # a misspelt key must not leave the default in place
        ({REFRESH: {"maxDeliveryCount": "3"}}, ValueError),
        ({REFRESH: {"lockDuration": "five minutes"}}, ValueError),
        ({REFRESH: {"maxDeliveryCount": 0}}, ValueError),
        ({"integration.token.no-such-queue": {}}, KeyError),
    ],
)
def test_queue_properties_refuses_what_deploy_would_not_create(overrides, error):
    with pytest.raises(error):
        queue_properties(overrides)


def test_duplicate_detection_without_a_window_gets_the_documented_ten_minutes(tmp_path):
    path = tmp_path / "queues.json"
    path.write_text(json.dumps({"queues": {"a": {"requiresDuplicateDetection": True}}}), "utf-8")
    assert queue_properties(path=path)["a"].duplicate_detection_window == timedelta(minutes=10)


# ------------------------------------------------------------------------------------------- duplicate detection


@pytest.mark.parametrize("settle", ["complete", "dead_letter"])
def test_a_messageid_seen_within_the_window_is_dropped_whatever_became_of_the_first(clock, settle):
    model = model_of(clock, duplicate_detection_window=WINDOW)
    assert model.send(QUEUE, message("m-1"))
    delivery = receive(model)
    if settle == "complete":
        model.complete(delivery)
    else:
        model.dead_letter(delivery, "Poison")
    clock.advance(WINDOW.total_seconds() - 1)
    again = message("m-1")
    assert model.send(QUEUE, again) is False
    assert model.dropped_duplicates(QUEUE) == [again]
    assert model.active_count(QUEUE) == 0
    assert model.receive(QUEUE) is None


def test_a_messageid_is_accepted_again_after_the_window(clock):
    model = model_of(clock, duplicate_detection_window=WINDOW)
    assert model.send(QUEUE, message("m-1"))
    clock.advance(WINDOW.total_seconds() + 1)
    assert model.send(QUEUE, message("m-1"))
    assert model.active_count(QUEUE) == 2
    assert model.dropped_duplicates(QUEUE) == []


def test_without_a_window_every_send_is_accepted(clock):
    model = model_of(clock)
    assert model.send(QUEUE, message("m-1"))
    assert model.send(QUEUE, message("m-1"))
    assert model.active_count(QUEUE) == 2


def test_a_scheduled_messages_messageid_counts_from_schedule_time(clock):
    model = model_of(clock, duplicate_detection_window=WINDOW)
    model.schedule(QUEUE, message("m-1"), clock.now() + timedelta(hours=1))
    assert model.send(QUEUE, message("m-1")) is False  # the scheduled one is not even visible yet

    assert model.send(QUEUE, message("m-2"))
    number = model.schedule(QUEUE, message("m-2"), clock.now() + timedelta(minutes=1))
    assert isinstance(number, int)  # the sender cannot tell it was dropped...
    assert model.scheduled_count(QUEUE) == 1  # ...but only m-1 waits
    model.cancel_scheduled(QUEUE, number)  # cancelling the dropped one's number changes nothing
    clock.advance(3600)
    assert [receive(model).message.message_id, receive(model).message.message_id] == ["m-2", "m-1"]
    assert model.receive(QUEUE) is None


# -------------------------------------------------------------------------------------------------- refused sends


def test_a_session_queue_refuses_a_message_without_session_id(clock):
    model = model_of(clock)
    with pytest.raises(MessageRefusedError):
        model.send(SESSIONS, message())
    assert model.active_count(SESSIONS) == 0


def test_a_message_over_the_standard_tiers_256_kb_is_refused(clock):
    model = model_of(clock)
    overhead = message(application_properties={"type": "refresh"}).size_bytes - 2
    fits = message("m-1", application_properties={"type": "refresh"})
    fits.body = b"x" * (256 * 1024 - overhead)
    assert fits.size_bytes == 256 * 1024
    assert model.send(QUEUE, fits)
    too_big = replace(fits, message_id="m-2", body=fits.body + b"x")
    with pytest.raises(MessageRefusedError):
        model.send(QUEUE, too_big)
    assert model.active_count(QUEUE) == 1


def test_a_refused_message_is_not_remembered_by_duplicate_detection(clock):
    model = model_of(clock, duplicate_detection_window=WINDOW)
    with pytest.raises(MessageRefusedError):
        model.send(QUEUE, message("m-1", time_to_live=timedelta(0)))
    assert model.send(QUEUE, message("m-1"))


def test_a_messageid_over_128_characters_is_refused(clock):
    with pytest.raises(MessageRefusedError):
        model_of(clock).send(QUEUE, message("m" * 129))


# -------------------------------------------------------------------------------------------------------- sessions


def test_a_held_session_is_not_given_to_another_holder(clock):
    model = model_of(clock)
    model.send(SESSIONS, message("m-1", session_id="s-1"))
    model.send(SESSIONS, message("m-2", session_id="s-1"))
    assert model.accept_session(SESSIONS, "a") == "s-1"
    assert model.accept_session(SESSIONS, "b") is None  # s-1 still has a visible message, but a holds it
    with pytest.raises(SessionNotHeldError):
        model.receive(SESSIONS, "s-1", holder="b")
    assert model.receive(SESSIONS, "s-1", holder="a").message.message_id == "m-1"
    model.release_session(SESSIONS, "s-1", "a")
    assert model.accept_session(SESSIONS, "b") == "s-1"
    assert model.receive(SESSIONS, "s-1", holder="b").message.message_id == "m-2"


def test_receiving_from_a_session_queue_needs_the_session_held(clock):
    model = model_of(clock)
    model.send(SESSIONS, message("m-1", session_id="s-1"))
    with pytest.raises(SessionNotHeldError):
        model.receive(SESSIONS, "s-1")
    with pytest.raises(SessionNotHeldError):
        model.receive(SESSIONS)
    with pytest.raises(SessionNotHeldError):
        model.release_session(SESSIONS, "s-1", "a")
    assert model.active_count(SESSIONS) == 1


def test_a_session_without_a_visible_message_is_not_available(clock):
    model = model_of(clock)
    model.schedule(SESSIONS, message("m-1", session_id="s-1"), clock.now() + timedelta(seconds=5))
    assert model.accept_session(SESSIONS, "a") is None
    clock.advance(5)
    assert model.accept_session(SESSIONS, "a") == "s-1"


# ------------------------------------------------------------------------------------------------------ scheduling


def test_a_scheduled_message_is_invisible_until_its_time_then_delivered(clock):
    model = model_of(clock)
    at = clock.now() + timedelta(minutes=3)
    number = model.schedule(QUEUE, message("m-1"), at)
    assert (model.scheduled_count(QUEUE), model.active_count(QUEUE)) == (1, 0)
    assert model.next_due() == at
    clock.advance(179)
    assert model.receive(QUEUE) is None
    model.send(QUEUE, message("m-2"))
    clock.advance_to(at)
    assert (model.scheduled_count(QUEUE), model.active_count(QUEUE)) == (0, 2)
    assert receive(model).message.message_id == "m-2"  # appended behind what was already there...
    delivery = receive(model)
    assert delivery.sequence_number > number  # ...with a new sequence number
    assert delivery.enqueued_time == at  # the scheduled time is its enqueue time
    with pytest.raises(KeyError):
        model.cancel_scheduled(QUEUE, number)  # too late


def test_a_cancelled_scheduled_message_is_never_delivered(clock):
    model = model_of(clock)
    number = model.schedule(QUEUE, message(), clock.now() + timedelta(minutes=3))
    model.cancel_scheduled(QUEUE, number)
    assert model.scheduled_count(QUEUE) == 0
    clock.advance(3600)
    assert model.receive(QUEUE) is None
    with pytest.raises(KeyError):
        model.cancel_scheduled(QUEUE, number)


# ------------------------------------------------------------------------------------------------------- peek-lock


def test_an_expired_lock_redelivers_while_the_first_delivery_still_exists(clock):
    model = model_of(clock, lock_duration=timedelta(seconds=30))
    model.send(QUEUE, message())
    first = receive(model)
    assert first.delivery_count == 1
    assert first.locked_until == clock.now() + timedelta(seconds=30)
    assert model.next_due() == first.locked_until
    clock.advance(29)
    assert model.receive(QUEUE) is None  # still locked
    clock.advance(1)
    second = receive(model)
    assert (second.sequence_number, second.delivery_count) == (first.sequence_number, 2)
    with pytest.raises(MessageLockLostError):
        model.complete(first)
    model.complete(second)
    assert model.active_count(QUEUE) == 0


def test_renew_lock_extends_the_lock_from_now(clock):
    model = model_of(clock, lock_duration=timedelta(seconds=30))
    model.send(QUEUE, message())
    delivery = receive(model)
    clock.advance(20)
    assert model.renew_lock(delivery) == clock.now() + timedelta(seconds=30)
    assert delivery.locked_until == clock.now() + timedelta(seconds=30)
    clock.advance(25)  # past the first lock's end
    assert model.receive(QUEUE) is None
    model.complete(delivery)
    assert model.active_count(QUEUE) == 0


def test_renew_lock_after_the_lock_expired_fails(clock):
    model = model_of(clock, lock_duration=timedelta(seconds=30))
    model.send(QUEUE, message())
    delivery = receive(model)
    clock.advance(30)
    with pytest.raises(MessageLockLostError):
        model.renew_lock(delivery)


def test_abandon_redelivers_with_the_next_delivery_count(clock):
    model = model_of(clock)
    model.send(QUEUE, message("m-1"))
    model.send(QUEUE, message("m-2"))
    model.abandon(receive(model))
    again = receive(model)
    assert (again.message.message_id, again.delivery_count) == ("m-1", 2)  # back at the front


def test_a_message_is_delivered_max_delivery_count_times_then_dead_lettered(clock):
    model = model_of(clock, max_delivery_count=3)
    model.send(QUEUE, message())
    counts = []
    while (delivery := model.receive(QUEUE)) is not None:
        counts.append(delivery.delivery_count)
        model.abandon(delivery)
    assert counts == [1, 2, 3]
    [dead] = model.dead_letters(QUEUE)
    assert (dead.reason, dead.delivery_count, dead.message.message_id) == ("MaxDeliveryCountExceeded", 3, "m-1")
    assert model.active_count(QUEUE) == 0


def test_expired_locks_count_as_deliveries_toward_the_maximum(clock):
    model = model_of(clock, max_delivery_count=2, lock_duration=timedelta(seconds=30))
    model.send(QUEUE, message())
    receive(model)
    clock.advance(30)
    receive(model)
    clock.advance(30)
    assert model.receive(QUEUE) is None
    assert [dead.reason for dead in model.dead_letters(QUEUE)] == ["MaxDeliveryCountExceeded"]


def test_dead_letter_keeps_the_receivers_reason(clock):
    model = model_of(clock)
    model.send(QUEUE, message())
    model.dead_letter(receive(model), "PoisonMessage", "not a CloudEvent")
    [dead] = model.dead_letters(QUEUE)
    assert (dead.reason, dead.description, dead.delivery_count) == ("PoisonMessage", "not a CloudEvent", 1)


# ---------------------------------------------------------------------------------------------------- time to live


def test_an_expired_message_is_removed(clock):
    model = model_of(clock)
    model.send(QUEUE, message(time_to_live=timedelta(seconds=10)))
    clock.advance(10)
    assert model.active_count(QUEUE) == 0
    assert model.receive(QUEUE) is None
    assert model.dead_letters(QUEUE) == []


def test_an_expired_message_is_dead_lettered_when_the_queue_says_so(clock):
    model = model_of(clock, dead_lettering_on_message_expiration=True, default_message_ttl=timedelta(minutes=1))
    model.send(QUEUE, message(time_to_live=timedelta(hours=1)))  # the queue's default is a ceiling
    clock.advance(60)
    assert [dead.reason for dead in model.dead_letters(QUEUE)] == ["TTLExpiredException"]


def test_a_locked_message_expires_when_its_lock_ends_not_before(clock):
    model = model_of(clock, dead_lettering_on_message_expiration=True, lock_duration=timedelta(seconds=30))
    model.send(QUEUE, message("m-1", time_to_live=timedelta(seconds=10)))
    model.send(QUEUE, message("m-2", time_to_live=timedelta(seconds=10)))
    first, second = receive(model), receive(model)
    clock.advance(20)
    model.complete(first)  # completed under lock: handled, despite the nominal expiry
    model.abandon(second)
    assert [(dead.message.message_id, dead.reason) for dead in model.dead_letters(QUEUE)] == [
        ("m-2", "TTLExpiredException")
    ]


def test_a_scheduled_messages_time_to_live_starts_at_its_scheduled_time(clock):
    model = model_of(clock)
    model.schedule(QUEUE, message(time_to_live=timedelta(seconds=10)), clock.now() + timedelta(minutes=5))
    clock.advance(305)
    assert receive(model).message.message_id == "m-1"


# ------------------------------------------------------------------------------------------------- the SDK's types


def test_the_model_tells_each_queues_properties(clock):
    queues = queue_properties()
    model = ServiceBusModel(queues, clock.now)
    assert model.queues == queues
    assert model.properties(REFRESH).lock_duration == timedelta(minutes=5)
    with pytest.raises(KeyError):
        model.send("integration.token.no-such-queue", message())


def test_a_model_message_copies_an_sdk_message():
    sdk = ServiceBusMessage(
        b'{"a":1}',
        message_id="m-1",
        session_id="s-1",
        content_type="application/cloudevents+json",
        application_properties={"type": "refresh"},
        time_to_live=timedelta(minutes=5),
    )
    assert ModelMessage.of_sdk_message(sdk) == ModelMessage(
        body=b'{"a":1}',
        message_id="m-1",
        session_id="s-1",
        content_type="application/cloudevents+json",
        application_properties={"type": "refresh"},
        time_to_live=timedelta(minutes=5),
    )


def test_an_operation_is_atomic_for_other_threads(clock):
    # While a send is inside the model (here: reading the clock), another thread's question waits for the send's
    # end instead of seeing half a send.
    answers: list[int] = []
    others: list[threading.Thread] = []

    def clock_that_asks_meanwhile():
        if not others:
            others.append(threading.Thread(target=lambda: answers.append(model.active_count(QUEUE))))
            others[0].start()
            others[0].join(timeout=0.1)
            assert answers == []  # still waiting for the send
        return clock.now()

    model = ServiceBusModel([QueueProperties(name=QUEUE)], clock_that_asks_meanwhile)
    model.send(QUEUE, message())
    others[0].join(timeout=5)
    assert answers == [1]


def test_several_threads_receive_each_message_exactly_once(clock):
    model = model_of(clock)
    for index in range(400):
        model.send(QUEUE, message(f"m-{index}"))
    completed: list[str] = []

    def consume() -> None:
        while (delivery := model.receive(QUEUE)) is not None:
            model.complete(delivery)
            completed.append(delivery.message.message_id)

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(completed) == sorted(f"m-{index}" for index in range(400))


# ------------------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00:01", timedelta(seconds=1)),
        ("00:05:00", timedelta(minutes=5)),
        ("00:00:00.80", timedelta(milliseconds=800)),
        ("1.02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ],
)
def test_host_json_timespans(text, expected):
    assert parse_timespan(text) == expected


@pytest.mark.parametrize("text", ["PT1S", "1", "00:60:00", "00:00", ""])
def test_what_is_not_a_timespan_is_refused(text):
    with pytest.raises(ValueError):
        parse_timespan(text)


def test_processor_options_read_the_repos_host_json():
    path = ROOT / "host.json"
    raw = json.loads(path.read_text("utf-8"))["extensions"]["serviceBus"]
    options = ProcessorOptions.from_host_json(path)
    assert options.max_concurrent_calls == raw["maxConcurrentCalls"]
    assert options.max_concurrent_sessions == raw.get("maxConcurrentSessions", 8)
    assert options.auto_complete_messages == raw["autoCompleteMessages"]
    assert options.max_auto_lock_renewal_duration == parse_timespan(raw["maxAutoLockRenewalDuration"])
    idle = raw.get("sessionIdleTimeout")
    assert options.session_idle_timeout == (None if idle is None else parse_timespan(idle))
    try_timeout = raw.get("clientRetryOptions", {}).get("tryTimeout")
    assert options.try_timeout == (timedelta(seconds=60) if try_timeout is None else parse_timespan(try_timeout))


def test_processor_options_from_a_host_json(tmp_path):
    path = tmp_path / "host.json"
    service_bus = {
        "maxConcurrentCalls": 4,
        "sessionIdleTimeout": "00:00:00.25",
        "maxAutoLockRenewalDuration": "00:10:00",
    }
    path.write_text(json.dumps({"version": "2.0", "extensions": {"serviceBus": service_bus}}), "utf-8")
    assert ProcessorOptions.from_host_json(path) == ProcessorOptions(
        max_concurrent_calls=4,
        session_idle_timeout=timedelta(milliseconds=250),
        max_auto_lock_renewal_duration=timedelta(minutes=10),
    )


def test_without_session_idle_timeout_a_session_waits_the_clients_try_timeout(tmp_path):
    path = tmp_path / "host.json"
    service_bus = {"maxConcurrentSessions": 2, "clientRetryOptions": {"tryTimeout": "00:00:30"}}
    path.write_text(json.dumps({"version": "2.0", "extensions": {"serviceBus": service_bus}}), "utf-8")
    options = ProcessorOptions.from_host_json(path)
    assert (options.session_idle_timeout, options.effective_session_idle_timeout) == (None, timedelta(seconds=30))
    clock = VirtualClock()
    model = loaded(clock, [1, 1, 1], sessions=True)
    run = simulate_processor(model, SESSIONS, options, lambda _: 1.0, clock, sessions=True)
    assert run.elapsed_seconds == 1 + 30 + 1  # the third session waits for a slot's 30 s wait to end


def loaded(clock: VirtualClock, messages_per_session: list[int], sessions: bool, **properties) -> ServiceBusModel:
    model = model_of(clock, **properties)
    for session, count in enumerate(messages_per_session):
        for index in range(count):
            session_id = f"s-{session}" if sessions else None
            model.send(SESSIONS if sessions else QUEUE, message(f"m-{session}-{index}", session_id))
    return model


def test_without_sessions_throughput_is_concurrent_calls_over_handler_time(clock):
    model = loaded(clock, [1] * 400, sessions=False)
    options = ProcessorOptions(max_concurrent_calls=16)
    run = simulate_processor(model, QUEUE, options, lambda _: 0.04, clock, sessions=False)
    assert run.messages_handled == 400
    assert run.max_concurrent_handlers == 16
    assert run.throughput == pytest.approx(16 / 0.04, rel=0.05)
    assert model.active_count(QUEUE) == 0


@pytest.mark.parametrize(("idle_timeout", "idle_s"), [(timedelta(seconds=1), 1.0), (None, 60.0)])
def test_with_one_message_per_session_throughput_is_slots_over_handler_plus_idle_timeout(clock, idle_timeout, idle_s):
    model = loaded(clock, [1] * 1600, sessions=True)  # 100 sessions per slot: the last round's missing wait is 1 %
    options = ProcessorOptions(max_concurrent_sessions=16, session_idle_timeout=idle_timeout)
    run = simulate_processor(model, SESSIONS, options, lambda _: 0.04, clock, sessions=True)
    assert (run.messages_handled, run.sessions_accepted, run.max_concurrent_handlers) == (1600, 1600, 16)
    assert run.throughput == pytest.approx(16 / (0.04 + idle_s), rel=0.05)
    assert model.held_sessions(SESSIONS) == {}


def test_a_sessions_messages_are_handled_one_at_a_time_in_order(clock):
    model = loaded(clock, [3], sessions=True)
    handled: list[str] = []

    def handler(delivery: Delivery) -> float:
        handled.append(delivery.message.message_id)
        return 0.5

    options = ProcessorOptions(max_concurrent_sessions=4, session_idle_timeout=timedelta(seconds=1))
    run = simulate_processor(model, SESSIONS, options, handler, clock, sessions=True)
    assert handled == ["m-0-0", "m-0-1", "m-0-2"]
    assert run.max_concurrent_handlers == 1
    assert run.elapsed_seconds == pytest.approx(1.5)  # no idle wait between a session's messages


@pytest.mark.parametrize("sessions", [False, True])
def test_a_handler_longer_than_renewal_plus_lock_is_redelivered_while_it_runs(clock, sessions):
    model = loaded(clock, [1], sessions, lock_duration=timedelta(minutes=1))
    options = ProcessorOptions(
        max_concurrent_calls=2, max_concurrent_sessions=2, max_auto_lock_renewal_duration=timedelta(minutes=5)
    )
    started: list[tuple[int, float]] = []
    start = clock.now()

    def handler(delivery: Delivery) -> float:
        started.append((delivery.delivery_count, (clock.now() - start).total_seconds()))
        return 600.0 if delivery.delivery_count == 1 else 1.0

    run = simulate_processor(model, SESSIONS if sessions else QUEUE, options, handler, clock, sessions)
    [(first_count, first_at), (second_count, second_at)] = started
    assert (first_count, first_at, second_count) == (1, 0.0, 2)
    assert 300 < second_at <= 360  # renewed for 5 minutes, lost within one lock duration after
    assert run.deliveries_per_message == {"m-0-0": 2}
    assert (run.messages_handled, run.lost_lock_completions, run.max_concurrent_handlers) == (1, 1, 2)
    assert run.elapsed_seconds == 600.0  # the first handler still ran to its end


def test_a_handler_within_renewal_keeps_its_lock(clock):
    model = loaded(clock, [1], sessions=False, lock_duration=timedelta(minutes=1))
    options = ProcessorOptions(max_concurrent_calls=2, max_auto_lock_renewal_duration=timedelta(minutes=5))
    run = simulate_processor(model, QUEUE, options, lambda _: 299.0, clock, sessions=False)
    assert (run.handler_invocations, run.lost_lock_completions, run.messages_handled) == (1, 0, 1)


def test_cpu_parts_share_the_worker_process_whatever_the_concurrency(clock):
    model = loaded(clock, [1] * 200, sessions=False)
    options = ProcessorOptions(max_concurrent_calls=16)
    run = simulate_processor(model, QUEUE, options, lambda _: 0.02, clock, False, cpu_seconds=lambda _: 0.01)
    assert run.throughput == pytest.approx(1 / 0.01, rel=0.05)  # one GIL: 100 CPU parts of 10 ms per second


def test_the_processor_refuses_a_mode_the_queue_does_not_have(clock):
    with pytest.raises(ValueError):
        simulate_processor(model_of(clock), QUEUE, ProcessorOptions(), lambda _: 1.0, clock, sessions=True)
