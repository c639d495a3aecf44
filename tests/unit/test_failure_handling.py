"""Failure handling without services: retries inside one invocation (back-off, Retry-After, the time
budget) and the Service Bus MessageId of a refresh request. The same rules against the real services are
in tests/integration/test_failure_handling.py."""

import time
from datetime import UTC, datetime

import pytest

from shared.events import RefreshRequestedData, make_event
from shared.failure_classes import FailureKind
from shared.manager_client import RefreshOutcome, parse_retry_after
from shared.messaging import service_bus_message, service_bus_message_id
from shared.settings import load_settings
from shared.times import utc_now
from shared.token_refresh import call_with_retries, earlier_in_retry_chain, retry_delay_ms, scheduled_retry_number
from tests.support.documents import request_for
from tests.support.helpers import check_event


def outcome(status=None, retry_after=None):
    if status is None:
        return RefreshOutcome(True, http_status=200)
    kind = FailureKind.TRANSIENT if status >= 500 or status == 429 else FailureKind.CONNECTION
    return RefreshOutcome(False, http_status=status, error_code="x", kind=kind, retry_after_s=retry_after)


def test_transient_failures_are_retried_with_growing_jittered_waits():
    answers = iter([outcome(503), outcome(503), outcome(None)])
    waits = []
    result, calls = call_with_retries(
        lambda: next(answers), max_attempts=5, budget_s=60, initial_backoff_s=0.5, sleep=waits.append
    )
    assert result.succeeded and calls == 3
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 1.5  # 0.5 * 2^n plus up to 0.5 s of jitter


def test_retry_after_is_honoured_when_longer_than_the_back_off():
    answers = iter([outcome(429, retry_after=7.0), outcome(None)])
    waits = []
    result, calls = call_with_retries(lambda: next(answers), 3, 60, 0.5, waits.append)
    assert result.succeeded and calls == 2 and waits == [7.0]


def test_a_wait_that_would_pass_the_budget_ends_the_invocation_instead():
    waits = []
    result, calls = call_with_retries(lambda: outcome(429, retry_after=120.0), 5, 30, 0.5, waits.append)
    assert (result.succeeded, calls, waits) == (False, 1, [])


def test_the_budget_counts_the_time_the_first_call_took():
    # The first call is made before the retry machinery is set up (the usual call succeeds): its time
    # still counts. 0.2 s spent + a 0.1 s back-off passes a 0.25 s budget, so no second call.
    def slow_failure():
        time.sleep(0.2)
        return outcome(503)

    waits = []
    result, calls = call_with_retries(slow_failure, 5, 0.25, 0.1, waits.append)
    assert (result.transient, calls, waits) == (True, 1, [])


def test_a_success_at_once_is_one_call_and_no_wait():
    waits = []
    result, calls = call_with_retries(lambda: outcome(None), 5, 60, 0.5, waits.append)
    assert (result.succeeded, calls, waits) == (True, 1, [])


def test_permanent_failures_are_not_retried():
    waits = []
    result, calls = call_with_retries(lambda: outcome(400), 5, 60, 0.5, waits.append)
    assert (result.retryable, calls, waits) == (False, 1, [])


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        ("999999", 3600.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("-5", None),
        ("²", None),  # str.isdigit() accepts it; float() does not
        ("١٢", None),  # Arabic-Indic digits: not HTTP's delta-seconds
    ],
)
def test_retry_after_parsing(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_http_date():
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now=now) == 30.0


def test_a_later_round_of_a_request_gets_a_message_id_of_its_own_and_a_copy_of_a_round_the_same_one():
    # Duplicate detection drops a repeated MessageId for its whole history window: a check that asks again after
    # the request ended retryable (round 1) must not be dropped; a copy of the same round must.
    first = request_for("c-1", utc_now())
    data = RefreshRequestedData.model_validate(first.data)
    again = make_event(data.model_copy(update={"attempt_round": 1}), time=utc_now())
    copy = make_event(data.model_copy(update={"attempt_round": 1, "requested_at": utc_now()}), time=utc_now())
    assert first.id == again.id == copy.id  # one request, one claim
    assert service_bus_message_id(first) == first.id
    assert service_bus_message_id(again) == service_bus_message_id(copy) == f"{first.id}.round-1"
    assert "attemptRound" not in first.data and again.data["attemptRound"] == 1
    assert len(service_bus_message_id(make_event(data.model_copy(update={"attempt_round": 10**6})))) <= 128
    check = check_event()
    assert service_bus_message_id(check) == check.id  # only refresh requests have rounds
    assert service_bus_message(first).session_id is None  # the refresh queue is not session-enabled


# Scheduled copies after a Cosmos outage (shared.token_refresh.earlier_in_retry_chain) ------------------------------


@pytest.mark.parametrize(
    ("earlier", "later", "expected"),
    [
        ("req", "req.retry-0.1", True),  # the round's first delivery scheduled it
        ("req.retry-0.1", "req.retry-0.2", True),
        ("req.round-2", "req.retry-2.1", True),
        ("req.retry-2.3", "req.retry-2.4", True),
        ("req.retry-0.2", "req.retry-0.2", False),  # itself: a redelivery, judged by the delivery count
        ("req.retry-0.3", "req.retry-0.2", False),  # a later one
        ("req", "req.retry-1.1", False),  # another round's
        ("req.round-1", "req.retry-2.1", False),
        ("other", "req.retry-0.1", False),
        ("req", "req", False),  # not a scheduled copy
        ("req", "req.round-1", False),
    ],
)
def test_a_scheduled_copy_succeeds_only_its_own_earlier_deliveries(earlier, later, expected):
    assert earlier_in_retry_chain(earlier, later) is expected


@pytest.mark.parametrize(
    ("message_id", "number"),
    [(None, 0), ("req", 0), ("req.round-3", 0), ("req.retry-0.1", 1), ("req.retry-3.12", 12), ("x.retry-0.1.y", 0)],
)
def test_the_retry_number_travels_in_the_message_id(message_id, number):
    assert scheduled_retry_number(message_id) == number


def test_the_retry_delay_doubles_but_always_leaves_room_before_the_token_expires():
    # After an outage of about a minute, retries doubling from 1 s waited up to 32 s more: tokens with 80 s left
    # expired waiting for a copy that came after the outage had ended.
    settings = load_settings({"TOKEN_REFRESH_RETRY_DELAY_MS": "1000"})
    now = 1_000_000_000
    far = datetime.fromtimestamp((now + 3_600_000) / 1000, UTC)  # an hour left
    assert [retry_delay_ms(settings, n, far, now) for n in range(6)] == [1000, 2000, 4000, 8000, 16000, 32000]
    soon = datetime.fromtimestamp((now + 40_000) / 1000, UTC)  # 40 s left: never more than 10 s
    assert [retry_delay_ms(settings, n, soon, now) for n in range(6)] == [1000, 2000, 4000, 8000, 10000, 10000]
    expired = datetime.fromtimestamp((now - 5_000) / 1000, UTC)
    assert retry_delay_ms(settings, 5, expired, now) == 1000  # at least the setting
    assert retry_delay_ms(settings, 20, None, now) == 15 * 60 * 1000  # no expiry: the cap
