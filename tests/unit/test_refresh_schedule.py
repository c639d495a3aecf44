"""The pacing arithmetic of shared.refresh_schedule: grid times, soonest-expiring first, spread, late
tokens, continuation across invocations. The state store is a dictionary here (its Cosmos side is in
tests/integration/test_pacing.py)."""

import itertools
import logging
import random
from datetime import UTC, datetime, timedelta

import pytest

from shared.connection_store import ExpiringConnection
from shared.refresh_schedule import (
    BACKLOG_ALARM,
    SAVE_EVERY_MS,
    SCHEDULE_LEAD_MS,
    RefreshScheduler,
    describe_rate,
)
from shared.settings import SAFETY_MARGIN_MS, load_settings
from tests.support.helpers import most_in_any_window

NOW_MS = 1_800_000_000_000
START = NOW_MS + SCHEDULE_LEAD_MS  # the first grid time of a schedule


class Clock:
    def __init__(self, now_ms: int = NOW_MS):
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


class PacingDocuments:
    """StateStore's two pacing methods over a dictionary, with its merge rule (the later slot wins)."""

    def __init__(self):
        self.documents: dict[str, dict] = {}

    def pacing(self, integration_id):
        return self.documents.get(integration_id)

    def save_pacing(self, integration_id, *, next_slot_ms, ttl_s, stored=None):
        earlier = self.documents.get(integration_id, {})
        self.documents[integration_id] = {"nextSlotMs": max(next_slot_ms, earlier.get("nextSlotMs", 0))}


def connection(n: int, integration: str = "salesforce", expires_in_ms: int | None = 3_600_000) -> ExpiringConnection:
    expires = None if expires_in_ms is None else datetime.fromtimestamp((NOW_MS + expires_in_ms) / 1000, UTC)
    return ExpiringConnection(connection_id=f"c-{n}", integration_id=integration, tenant_id="t", expires_at=expires)


def scheduler(environ: dict, states=None, clock=None, seed=7):
    return RefreshScheduler(
        load_settings(environ),
        states or PacingDocuments(),
        clock=clock or Clock(),
        rng=random.Random(seed),
    )


def ms(moment: datetime | None, now_ms: int = NOW_MS) -> int:
    """A scheduled time in epoch ms; None (at once) is `now_ms`."""
    return now_ms if moment is None else round(moment.timestamp() * 1000)


def test_a_limit_spaces_an_integrations_requests_evenly_from_now():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=5/s,*=50/s"})
    times = [ms(pacer.time_for(connection(n))) for n in range(100)]
    assert times[0] == START  # the first one at once (after the lead for publishing and delivery)
    assert [b - a for a, b in itertools.pairwise(times)] == [200] * 99
    assert most_in_any_window(times, 1000) == 5
    other = [ms(pacer.time_for(connection(n, "hubspot"))) for n in range(100)]
    assert other[1] - other[0] == 20  # `*` covers the others
    assert pacer.schedules["salesforce"].scheduled == 100
    assert pacer.schedules["salesforce"].last_ms == START + 99 * 200


def test_without_a_limit_or_spread_for_its_integration_a_request_is_due_at_once():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=5/s"})
    assert pacer.time_for(connection(1, "hubspot")) is None
    assert pacer.time_for(connection(2, "hubspot")) is None


def test_a_request_never_gets_a_time_already_past_when_the_scan_is_slow():
    clock = Clock()
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=10/s"}, clock=clock)
    assert ms(pacer.time_for(connection(1))) == START
    clock.now += 5_000  # the next page comes 5 s later: the grid times in between have passed
    assert ms(pacer.time_for(connection(2))) == START + 5_000  # the first grid time not yet past
    assert ms(pacer.time_for(connection(3))) == START + 5_100


def test_the_spread_delays_requests_randomly_but_never_past_expiry_minus_the_margin():
    spread = 600_000
    pacer = scheduler({"TOKEN_REFRESH_SPREAD_MS": str(spread)})
    early = [connection(n, expires_in_ms=SAFETY_MARGIN_MS + 60_000) for n in range(200)]  # 1 min of room
    late = [connection(n, expires_in_ms=3_600_000) for n in range(200, 400)]
    expired = [connection(n, expires_in_ms=-1000) for n in range(400, 410)]
    early_times = [ms(pacer.time_for(c)) for c in early]
    late_times = [ms(pacer.time_for(c)) for c in late]
    assert all(ms(pacer.time_for(c)) == NOW_MS for c in expired)  # undelayed
    assert all(NOW_MS <= t <= NOW_MS + 60_000 for t in early_times)
    assert all(NOW_MS <= t < NOW_MS + spread for t in late_times)
    # Spread out, not bunched: every tenth of the window gets some.
    assert len({(t - NOW_MS) * 10 // spread for t in late_times}) == 10


def test_with_a_limit_and_a_spread_the_limit_still_holds_in_every_second():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=5/s", "TOKEN_REFRESH_SPREAD_MS": "60000"})
    connections = [connection(n, expires_in_ms=3_600_000) for n in range(250)]
    times = [ms(pacer.time_for(c)) for c in connections]
    assert len(set(times)) == 250
    assert most_in_any_window(times, 1000) <= 5
    assert max(times) <= NOW_MS + 60_000  # 250 requests at 5/s fit in the 60 s window: all of them in it


def test_soonest_expiring_first_and_late_tokens_are_counted_and_warned_once(caplog):
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=5/s"})
    # 100 tokens expiring 0.1 s apart from +1 s: at 5/s the backlog takes 20 s, the tokens expire within 11 s.
    connections = [connection(n, expires_in_ms=1_000 + 100 * n) for n in range(100)]
    times = [ms(pacer.time_for(c)) for c in connections]
    assert times == sorted(times)
    late = [c for c, t in zip(connections, times, strict=True) if t > ms(c.expires_at)]
    schedule = pacer.schedules["salesforce"]
    assert schedule.late == len(late) > 0
    assert schedule.first_late_expiry_ms == ms(late[0].expires_at)
    with caplog.at_level(logging.INFO, logger="shared.refresh_schedule"):
        pacer.report()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.alarm == BACKLOG_ALARM
    assert warning.pacedIntegration == "salesforce"
    assert (warning.scheduled, warning.late) == (100, len(late))
    assert f"{len(late)} of 100 refresh request(s)" in warning.getMessage()
    assert "TOKEN_REFRESH_RATE_LIMITS" in warning.getMessage()


class ScriptedRandom:
    """random.Random's random() answering the given values in turn: a spread target chosen by the test."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_a_spread_request_whose_window_is_taken_gets_the_earliest_free_time_not_one_past_its_window():
    # 1/s, spread 60 s: grid times START + k s. Five requests with room take k = 5..9 (targets +6 .. +10 s).
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=1/s", "TOKEN_REFRESH_SPREAD_MS": "60000"})
    pacer._rng = ScriptedRandom(0.1, 0.11667, 0.13334, 0.15, 0.16667, 0.55)
    taken = [ms(pacer.time_for(connection(n))) for n in range(5)]
    assert taken == [START + k * 1000 for k in range(5, 10)]
    # Its window ends at +10 s (expiry - margin); its target +5.5 s wants k = 5: taken up to k = 9, and
    # k = 10 (+11 s) is past the window. It gets the earliest free time instead: k = 0.
    soon = connection(9, expires_in_ms=SAFETY_MARGIN_MS + 10_000)
    assert ms(pacer.time_for(soon)) == START


def test_a_follow_up_of_the_same_scan_continues_the_schedule():
    states = PacingDocuments()
    first = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=10/s"}, states=states)
    times = [ms(first.time_for(connection(n))) for n in range(50)]
    first.save(final=True)
    follow_up = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=10/s"}, states=states)
    more = [ms(follow_up.time_for(connection(n, expires_in_ms=3_600_000))) for n in range(50, 100)]
    assert more[0] == times[-1] + 100
    assert most_in_any_window(times + more, 1000) == 10


def test_a_later_check_paces_new_requests_after_an_earlier_schedule_that_is_still_running():
    # Which requests are still waiting is the claims' business (select_for_refresh: SCHEDULED); the schedule only
    # continues after the earlier one, so a new request never lands on top of the wave.
    states, clock = PacingDocuments(), Clock()
    environ = {"TOKEN_REFRESH_RATE_LIMITS": "*=10/s"}
    first = scheduler(environ, states=states, clock=clock)
    wave = [connection(n, expires_in_ms=600_000 + n) for n in range(100)]  # 10 s of requests
    [first.time_for(c) for c in wave]
    first.save(final=True)

    clock.now += 3_000  # the next check comes while the wave is being delivered
    second = scheduler(environ, states=states, clock=clock)
    newcomer = connection(500, expires_in_ms=900_000)
    assert ms(second.time_for(newcomer)) == START + 10_000  # after the wave, not on top of it
    assert second.schedules["salesforce"].urgent == 0

    clock.now += 60_000  # the wave has run: whatever is still due is asked for at once
    third = scheduler(environ, states=states, clock=clock)
    assert ms(third.time_for(wave[0])) == clock.now + SCHEDULE_LEAD_MS


def test_a_new_request_is_not_held_back_by_an_earlier_backlog_that_would_make_it_late():
    # Was: a backlog reaching +3 h made every token expiring before its end WAITING, and a new connection whose
    # token expires in 20 minutes was not requested at all (and, had it been, it would have been scheduled at +3 h).
    states, clock = PacingDocuments(), Clock()
    environ = {"TOKEN_REFRESH_RATE_LIMITS": "*=1/s"}
    first = scheduler(environ, states=states, clock=clock)
    backlog = [connection(n, expires_in_ms=4 * 3_600_000 + n) for n in range(3 * 3600)]  # 3 h at 1/s
    [first.time_for(c) for c in backlog]
    first.save(final=True)

    clock.now += 60_000
    second = scheduler(environ, states=states, clock=clock)
    soon = [connection(20_000 + n, expires_in_ms=20 * 60_000) for n in range(3)]
    times = [ms(second.time_for(c)) for c in soon]
    # Its own grid from now, at the limit among themselves; the call-time slots interleave them with the backlog.
    assert times == [clock.now + SCHEDULE_LEAD_MS + k * 1000 for k in range(3)]
    assert second.schedules["salesforce"].urgent == 3
    assert second.schedules["salesforce"].late == 0
    # A token the backlog leaves in time still queues behind it: the backlog keeps its order.
    later = connection(30_000, expires_in_ms=5 * 3_600_000)
    assert ms(second.time_for(later)) >= START + 3 * 3_600_000


def test_tokens_without_expiry_are_scheduled_and_never_late():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=2/s"})
    times = [pacer.time_for(connection(n, expires_in_ms=None)) for n in range(3)]
    assert ms(times[0]) == START and ms(times[2]) == START + 1000
    assert pacer.schedules["salesforce"].late == 0


def test_many_integrations_are_paced_independently():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "a=4/s,b=8/s,*=2/s"})
    times: dict[str, list[int]] = {}
    for n in range(300):
        integration = "abc"[n % 3]
        times.setdefault(integration, []).append(ms(pacer.time_for(connection(n, integration))))
    assert {i: most_in_any_window(t, 1000) for i, t in times.items()} == {"a": 4, "b": 8, "c": 2}


@pytest.mark.parametrize(
    ("rate", "text"), [(5.0, "5/s"), (0.5, "30/min"), (2 / 60, "2/min"), (1 / 3600, "1/h"), (None, "no limit")]
)
def test_limits_are_described_as_written(rate, text):
    assert describe_rate(rate) == text


def test_now_is_the_default_target_with_timezone_aware_times():
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=1/s"})
    pacer.time_for(connection(1))
    second = pacer.time_for(connection(2))
    assert second.tzinfo is not None and second - datetime.fromtimestamp(START / 1000, UTC) == timedelta(seconds=1)


def test_between_pages_the_schedule_is_recorded_at_most_every_few_seconds_and_always_at_the_end():
    states, clock = PacingDocuments(), Clock()
    pacer = scheduler({"TOKEN_REFRESH_RATE_LIMITS": "*=10/s"}, states=states, clock=clock)
    pacer.time_for(connection(1))
    pacer.save()  # a page published right away: not recorded yet
    assert states.documents == {}
    clock.now += SAVE_EVERY_MS
    pacer.time_for(connection(2))
    pacer.save()
    assert states.documents["salesforce"]["nextSlotMs"] == START + SAVE_EVERY_MS + 100  # after the 2nd
    pacer.time_for(connection(3))
    pacer.save(final=True)  # the end of the invocation, or a hand-off to a follow-up check
    assert states.documents["salesforce"]["nextSlotMs"] == START + SAVE_EVERY_MS + 200
