"""Service Bus duplicate detection as localdev.duplicate_detection models it (and the local host applies to its
refresh queue): the history window, a dropped duplicate not restarting it, one history shared through a file by
instances (processes) one after another and at once, and how the local host names a message's MessageId."""

import json
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest

from localdev.duplicate_detection import COMPACT_SLACK_LINES, DuplicateDetection
from localdev.local_host import (
    LocalHost,
    describe_window,
    duplicate_history_path,
    replay_message_id,
    service_bus_message_id_of,
)
from localdev.scheduled_delivery import SERVICE_BUS_MESSAGE_ID_HEADER, DeliveryScheduler, retry_message_id
from localdev.service_bus_model import queue_properties
from shared.errors import SettingsError
from shared.events import REFRESH_REQUESTED, RefreshRequestedData, make_event
from shared.settings import load_settings
from tests.support.helpers import numbered_refresh_request

WINDOW = timedelta(hours=2)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


# The window -----------------------------------------------------------------------------------------


def test_a_message_id_is_accepted_once_within_the_window_and_again_after_it():
    clock = Clock()
    queue = DuplicateDetection(WINDOW, clock)
    assert queue.first_time("m-1") is True
    assert queue.first_time("m-1") is False
    assert queue.first_time("m-2") is True  # another MessageId is another message
    clock.advance(hours=1, minutes=59, seconds=59)
    assert queue.first_time("m-1") is False
    clock.advance(seconds=1)  # the window has passed since it was accepted
    assert queue.first_time("m-1") is True
    assert queue.first_time("m-1") is False  # and the window starts again from now


def test_a_dropped_duplicate_does_not_restart_the_window():
    clock = Clock()
    queue = DuplicateDetection(WINDOW, clock)
    assert queue.first_time("m-1") is True
    clock.advance(hours=1, minutes=30)
    assert queue.first_time("m-1") is False  # dropped 90 min after the first
    clock.advance(minutes=30)  # 2 h after the first, 30 min after the dropped copy
    assert queue.first_time("m-1") is True


def test_the_window_must_be_positive():
    for window in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="must be positive"):
            DuplicateDetection(window)


def test_expired_message_ids_are_forgotten():
    clock = Clock()
    queue = DuplicateDetection(WINDOW, clock)
    for n in range(100):
        queue.first_time(f"old-{n}")
    clock.advance(hours=3)
    queue.first_time("new")
    assert list(queue._accepted) == ["new"]


def test_concurrent_senders_of_one_message_id_get_it_accepted_once():
    queue = DuplicateDetection(WINDOW)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        results.append(queue.first_time("m-1"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


# One history in a file --------------------------------------------------------------------------------


def test_a_history_file_is_shared_by_instances_one_after_another(tmp_path):
    """As two `run --once` processes: the second sees what the first accepted, and its window."""
    clock, path = Clock(), tmp_path / "queue" / "history.jsonl"
    first = DuplicateDetection(WINDOW, clock, path)
    assert first.first_time("m-1") is True
    assert first.first_time("m-2") is True
    clock.advance(hours=1)
    second = DuplicateDetection(WINDOW, clock, path)
    assert second.first_time("m-1") is False
    assert second.first_time("m-3") is True
    clock.advance(hours=1)  # 2 h after m-1 and m-2, 1 h after m-3
    third = DuplicateDetection(WINDOW, clock, path)
    assert third.first_time("m-1") is True
    assert third.first_time("m-3") is False


def test_instances_sharing_a_file_at_once_see_each_others_messages(tmp_path):
    """As hosts running at the same time on one queue: each reads what the others accepted before deciding."""
    path = tmp_path / "history.jsonl"
    one, other = DuplicateDetection(WINDOW, path=path), DuplicateDetection(WINDOW, path=path)
    assert one.first_time("m-1") is True
    assert other.first_time("m-1") is False
    assert other.first_time("m-2") is True
    assert one.first_time("m-2") is False


def accepted_by_a_process(path: Path, message_ids: list[str]) -> list[str]:
    """What one process (a host) accepts of `message_ids`, on the shared history file."""
    queue = DuplicateDetection(WINDOW, path=path)
    return [message_id for message_id in message_ids if queue.first_time(message_id)]


def test_processes_sending_the_same_message_ids_at_once_get_each_accepted_once(tmp_path):
    """Four hosts on one queue, each taking the same 300 MessageIds: each is accepted by exactly one of them."""
    path = tmp_path / "history.jsonl"
    message_ids = [f"m-{n}" for n in range(300)]
    # forkserver: no fork of this (multi-threaded) test process; the children import this module afresh.
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("forkserver")) as processes:
        accepted = list(processes.map(accepted_by_a_process, [path] * 4, [message_ids] * 4))
    assert sorted(m for each in accepted for m in each) == sorted(message_ids)


def test_deleting_the_history_file_clears_the_history_also_for_a_running_instance(tmp_path):
    path = tmp_path / "history.jsonl"
    queue = DuplicateDetection(WINDOW, path=path)
    assert queue.first_time("m-1") is True
    path.unlink()
    assert queue.first_time("m-1") is True
    assert DuplicateDetection(WINDOW, path=path).first_time("m-1") is False


def test_an_unreadable_line_of_the_history_file_is_skipped(tmp_path):
    clock, path = Clock(), tmp_path / "history.jsonl"
    path.write_text(f'not json\n["m-1", {clock().timestamp()}]\n{{"m-2": 1}}\n["half', "utf-8")
    queue = DuplicateDetection(WINDOW, clock, path)
    assert queue.first_time("m-1") is False
    assert queue.first_time("m-2") is True


def test_the_history_file_is_appended_to_and_rewritten_without_expired_entries_once_they_pile_up(tmp_path):
    """One line per accepted message (no rewrite of the whole history per message); the lines are rewritten without
    the expired ones when there are more than twice the live ones plus COMPACT_SLACK_LINES; the history is the same."""
    clock, path = Clock(), tmp_path / "history.jsonl"
    queue = DuplicateDetection(WINDOW, clock, path)
    old = COMPACT_SLACK_LINES + 10
    for n in range(old):
        queue.first_time(f"old-{n}")
    assert len(path.read_text("utf-8").splitlines()) == old
    clock.advance(hours=1)
    assert queue.first_time("live") is True
    clock.advance(hours=1, seconds=1)  # the old ones expired, "live" not
    for n in range(3):
        queue.first_time(f"new-{n}")
    lines = [json.loads(line)[0] for line in path.read_text("utf-8").splitlines()]
    assert lines == ["live", "new-0", "new-1", "new-2"]
    fresh = DuplicateDetection(WINDOW, clock, path)
    assert [fresh.first_time(m) for m in ("live", "new-2", "old-0")] == [False, False, True]


def test_many_messages_cost_little_each(tmp_path):
    """A large cycle (thousands of requests) must not spend its time rewriting the history."""
    queue = DuplicateDetection(WINDOW, path=tmp_path / "history.jsonl")
    started = datetime.now(UTC)
    for n in range(5_000):  # ~0.5 s; a whole-file rewrite per message took ~20 s
        queue.first_time(f"m-{n}")
    assert datetime.now(UTC) - started < timedelta(seconds=5)


# The local host's side --------------------------------------------------------------------------------


def test_the_refresh_queue_window_is_the_deployed_one():
    deployed = json.loads((Path(__file__).parents[2] / "localdev" / "service_bus_queues.json").read_text("utf-8"))
    assert deployed["queues"][REFRESH_REQUESTED]["duplicateDetectionHistoryTimeWindow"] == "PT2H"
    queues = queue_properties()  # what the local host reads the window from
    assert queues[REFRESH_REQUESTED].duplicate_detection_window == timedelta(hours=2)
    assert queues["integration.token.check-expiring"].duplicate_detection_window is None  # none there
    assert [describe_window(timedelta(**w)) for w in ({"hours": 2}, {"minutes": 10}, {"seconds": 30})] == [
        "2 h",
        "10 min",
        "30 s",
    ]


def test_the_history_lives_under_the_state_dir_one_file_per_exchange_and_queue(monkeypatch, tmp_path):
    class Settings:
        rabbitmq_exchange = "test.events.a/b"

    monkeypatch.setenv("LOCALDEV_STATE_DIR", str(tmp_path))
    path = duplicate_history_path(Settings(), "p.refresh-requested")  # type: ignore[arg-type]
    assert path == tmp_path / "servicebus" / "test.events.a%2Fb" / "p.refresh-requested.duplicates.jsonl"
    Settings.rabbitmq_exchange = ".."
    assert duplicate_history_path(Settings(), "q").parent == tmp_path / "servicebus" / "%2E%2E"  # type: ignore[arg-type]
    monkeypatch.delenv("LOCALDEV_STATE_DIR")
    assert duplicate_history_path(Settings(), "q").parts[-4:-2] == (".local", "servicebus")  # type: ignore[arg-type]


def test_a_messages_service_bus_message_id_is_the_one_azure_would_give_it():
    event = numbered_refresh_request(1)
    plain = pika.BasicProperties(message_id=event.id)
    assert service_bus_message_id_of(plain, event.to_json()) == "id-1"
    again = make_event(RefreshRequestedData.model_validate(event.data | {"attemptRound": 2}), event_id=event.id)
    assert service_bus_message_id_of(plain, again.to_json()) == "id-1.round-2"  # a later check's round
    retry = pika.BasicProperties(message_id=event.id, headers={SERVICE_BUS_MESSAGE_ID_HEADER: b"id-1.retry-0.1"})
    assert service_bus_message_id_of(retry, event.to_json()) == "id-1.retry-0.1" == retry_message_id(event, 1, 0)
    assert service_bus_message_id_of(plain, b"not json") == "id-1"  # no event: the RabbitMQ message id
    assert service_bus_message_id_of(pika.BasicProperties(), b"[]") is None


def test_a_dead_letters_replay_has_a_message_id_of_its_own():
    """As the Service Bus replay (`<MessageId>.replay-<sequence number>`): duplicate detection lets it through."""
    assert re.fullmatch(r"id-1\.replay-\d{13}", replay_message_id("id-1"))
    for unusable in (None, "", "x" * 120):
        assert re.fullmatch(r"[0-9a-f-]{36}\.replay", replay_message_id(unusable))


def test_a_state_dir_the_host_cannot_write_to_is_one_error_before_it_starts(monkeypatch, tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("", "utf-8")
    monkeypatch.setenv("LOCALDEV_STATE_DIR", str(not_a_directory))
    with pytest.raises(SettingsError, match="set LOCALDEV_STATE_DIR to a writable directory"):
        LocalHost(load_settings({"RABBITMQ_URL": "amqp://127.0.0.1:1/"}))
    monkeypatch.setenv("LOCALDEV_STATE_DIR", str(tmp_path / "state"))
    host = LocalHost(load_settings({"RABBITMQ_URL": "amqp://127.0.0.1:1/"}))
    assert host.duplicates is not None and host.duplicates.window == timedelta(hours=2)
    assert (tmp_path / "state" / "servicebus").is_dir()


# A send that failed --------------------------------------------------------------------------------------------


def test_a_message_id_whose_send_failed_is_forgotten_also_by_the_other_hosts_sharing_the_history(tmp_path):
    # Service Bus records a MessageId only when it takes the message. A retry whose send failed (RabbitMQ was
    # restarting) stayed recorded here, so its next send was dropped as a duplicate and the request was lost.
    clock, path = Clock(), tmp_path / "history.jsonl"
    host, other = DuplicateDetection(WINDOW, clock, path), DuplicateDetection(WINDOW, clock, path)
    assert host.first_time("req.retry-0.6") is True
    host.forget("req.retry-0.6")
    assert other.first_time("req.retry-0.6") is True  # the next send, from any host
    assert host.first_time("req.retry-0.6") is False  # that one was taken: its duplicates are dropped
    assert DuplicateDetection(WINDOW, clock, path).first_time("req.retry-0.6") is False  # a new process reads it so


def test_a_retry_the_schedule_could_not_send_is_accepted_when_it_is_sent_again():
    duplicates = DuplicateDetection(WINDOW, Clock())
    schedule = DeliveryScheduler(
        load_settings({"RABBITMQ_URL": "amqp://127.0.0.1:1/"}),
        "refresh",
        accepts=duplicates.first_time,
        forget=duplicates.forget,
    )
    event = numbered_refresh_request(1)
    sent = []

    def broker_down(*args):
        raise pika.exceptions.AMQPConnectionError("connection refused")

    schedule.deliver_later = broker_down
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        schedule.schedule_retry(event, 6, datetime.now(UTC))
    schedule.deliver_later = lambda *args: sent.append(args) or "refresh.scheduled"
    schedule.schedule_retry(event, 6, datetime.now(UTC))  # the redelivered message schedules it again
    assert len(sent) == 1
    schedule.schedule_retry(event, 6, datetime.now(UTC))  # a true duplicate of a sent one is still dropped
    assert len(sent) == 1
