"""The soak's figures (bench/soak_figures.py) on hand-made calls, token versions, requests and events: each figure
can fail, and counts what docs/scale.md#the-soak says it counts."""

import random

import pytest

from bench.soak_figures import (
    RefreshWrite,
    RequestSeen,
    TokenVersion,
    Window,
    alarms_matched,
    calls_per_token_lifetime,
    expired_while_refreshable,
    longest_available,
    missed_goals,
    most_in_any_window,
    pacing_figures,
    requests_without_outcome,
)
from bench.soak_plan import FORMATS, format_expiry, make_plan
from shared.ids import outcome_event_id
from shared.times import parse_expires_at

REFRESHED, FAILED = "integration.token.refreshed", "integration.token.refresh.failed"


# Windows -------------------------------------------------------------------------------------------------------


def test_a_window_is_half_open_so_calls_exactly_one_second_apart_never_share_a_one_second_window():
    assert most_in_any_window([0.0, 1.0, 2.0, 3.0], 1.0) == 1
    assert most_in_any_window([0.0, 0.999, 1.0], 1.0) == 2
    assert most_in_any_window([], 1.0) == 0


def test_the_busiest_window_is_found_wherever_it_starts_and_in_any_order():
    times = [5.0, 0.1, 9.95, 9.2, 9.5, 9.9, 12.0, 9.0]
    assert most_in_any_window(times, 1.0) == 5  # 9.0 .. 9.95
    assert most_in_any_window(times, 10.0) == 7  # 0.1 .. 9.95


def test_pacing_figures_judge_each_limited_integration_and_ignore_the_unlimited_ones():
    calls = [("salesforce", n * 0.25) for n in range(40)]  # 4/s for 10 s: at the limit
    calls += [("hubspot", 100 + n * 0.1) for n in range(10)]  # 10 calls in one second at 3/s
    calls += [("slack", 0.0)] * 50  # not limited
    figures = {f.integration_id: f for f in pacing_figures(calls, {"salesforce": 4.0, "hubspot": 3.0})}

    assert set(figures) == {"salesforce", "hubspot"}
    assert (figures["salesforce"].max_1s, figures["salesforce"].max_10s) == (4, 40)
    assert figures["salesforce"].ratio_10s == pytest.approx(1.0)
    assert figures["salesforce"].excess_1s == 0
    assert (figures["hubspot"].max_1s, figures["hubspot"].excess_1s) == (10, 7)
    assert figures["hubspot"].ratio_10s == pytest.approx(10 / 30)


def test_a_burst_after_a_backlog_breaks_the_ten_second_goal():
    steady = [("xero", n * 0.5) for n in range(20)]  # 2/s for 10 s
    burst = [("xero", 10 + n * 0.05) for n in range(20)]  # the backlog at once
    (figure,) = pacing_figures(steady + burst, {"xero": 2.0})
    assert figure.ratio_10s > 1.10
    assert figure.excess_1s > 1


# Tokens that expired while refreshable -------------------------------------------------------------------------


def version(connection: str, expires: float, ended: float | None = None, integration: str = "google") -> TokenVersion:
    return TokenVersion(connection, integration, expires, written_at=0.0, written_by="seed", ended_at=ended)


def judge(versions, blocked=None, windows=(), until=200.0):
    return expired_while_refreshable(versions, blocked or {}, windows, until=until, threshold_s=45, need_s=8)


def test_the_longest_stretch_no_window_covers():
    assert longest_available(0, 45, []) == 45
    assert longest_available(0, 45, [Window(5, 20), Window(15, 30), Window(40, 50)]) == 10  # 30 .. 40
    assert longest_available(10, 20, [Window(0, 100)]) == 0


def test_a_token_replaced_before_its_expiry_was_refreshed_in_time_and_one_replaced_after_it_expired():
    verdicts = judge([version("a", 100, ended=60), version("b", 100, ended=100), version("c", 100, ended=101)])
    assert verdicts.refreshed_in_time == 2
    assert [v.connection_id for v in verdicts.expired] == ["c"]


def test_a_token_still_current_after_its_expiry_expired_and_one_expiring_after_the_end_is_not_judged():
    verdicts = judge([version("a", 150), version("b", 250)])
    assert [v.connection_id for v in verdicts.expired] == ["a"]
    assert verdicts.not_yet_due == 1


def test_a_connection_the_manager_refused_for_all_its_due_time_is_excused_and_one_refreshable_again_is_not():
    blocked = {"a": [Window(50, float("inf"), "revoked")], "b": [Window(10, 70, "grant refused (400)")]}
    verdicts = judge([version("a", 100), version("b", 100), version("c", 100)], blocked)
    assert [(v.connection_id, reason) for v, reason in verdicts.excused] == [("a", "revoked")]
    assert sorted(v.connection_id for v in verdicts.expired) == ["b", "c"]  # b: refreshable from 70 to 100


def test_a_fault_excuses_a_token_only_when_it_left_no_stretch_long_enough_to_refresh_it():
    windows = [Window(50, 96, "manager_5xx"), Window(150, 200, "manager_429", integration_id="xero")]
    verdicts = judge(
        [
            version("whole", 100),  # due from 55: failing until 96, 4 s left
            version("room-after", 110),  # due from 65: 96 .. 110 was free
            version("room-before", 60),  # due from 15: 15 .. 50 was free (the fault came later)
            version("xero", 190, integration="xero"),
            version("google", 190, integration="google"),
        ],
        windows=windows,
    )
    assert sorted(v.connection_id for v, _ in verdicts.excused) == ["whole", "xero"]
    assert sorted(v.connection_id for v in verdicts.expired) == ["google", "room-after", "room-before"]


def test_two_faults_back_to_back_do_not_excuse_a_token_lost_in_the_gap_between_them():
    # The app had 86 .. 95 between two faults: a token suppressed since the first one is still counted.
    verdicts = judge([version("a", 120)], windows=[Window(70, 86, "404 for all"), Window(95, 130, "cosmos blip")])
    assert [v.connection_id for v in verdicts.expired] == ["a"]
    verdicts = judge([version("a", 120)], windows=[Window(70, 89, "404 for all"), Window(95, 130, "cosmos blip")])
    assert [v.connection_id for v, _ in verdicts.excused] == ["a"]


def test_a_token_written_too_close_to_its_expiry_is_excused():
    (excused,) = judge([TokenVersion("a", "google", 105, written_at=100, written_by="create")]).excused
    assert excused[1] == "written too close to its expiry"


# Calls per token lifetime ---------------------------------------------------------------------------------------


def test_retries_of_one_request_count_once_and_another_key_for_the_same_token_counts_again():
    one = calls_per_token_lifetime(
        [
            RefreshWrite(("a", 1000), "req-a"),
            RefreshWrite(("a", 1000), "req-a"),  # a retry that refreshed again: the same key
            RefreshWrite(("b", 1000), "req-b"),
        ]
    )
    assert (one.figure, one.raw) == (1.0, 1.5)

    twice = calls_per_token_lifetime(
        [RefreshWrite(("a", 1000), "req-a"), RefreshWrite(("a", 1000), "req-a.1"), RefreshWrite(("b", 1000), "req-b")]
    )
    assert twice.figure == pytest.approx(1.5)
    assert twice.refreshed_more_than_once == [("a", 1000)]


def test_refreshes_without_a_key_each_count():
    assert calls_per_token_lifetime([RefreshWrite(("a", 1), None), RefreshWrite(("a", 1), None)]).figure == 2.0
    assert calls_per_token_lifetime([]).figure == 1.0


# Requests without an outcome -----------------------------------------------------------------------------------


def test_a_request_has_an_outcome_when_any_round_of_it_published_one():
    outcomes = {outcome_event_id("r1", 0, REFRESHED), outcome_event_id("r2", 2, FAILED)}
    verdicts = requests_without_outcome(
        [RequestSeen("r1", "a", 10), RequestSeen("r2", "b", 10, max_round=1), RequestSeen("r3", "c", 10)],
        outcomes,
        outcome_id=outcome_event_id,
        outcome_types=(REFRESHED, FAILED),
        churn={},
        cutoff=100,
    )
    assert verdicts.with_outcome == 2
    assert [r.request_id for r in verdicts.without_outcome] == ["r3"]


def test_churn_after_the_request_documents_a_missing_outcome_and_churn_long_before_does_not():
    churn = {"a": [(20.0, "revoked")], "b": [(1.0, "reconnected")]}
    verdicts = requests_without_outcome(
        [RequestSeen("r1", "a", 15), RequestSeen("r2", "b", 50)],
        set(),
        outcome_id=outcome_event_id,
        outcome_types=(REFRESHED,),
        churn=churn,
        cutoff=100,
    )
    assert [(r.request_id, why) for r, why in verdicts.documented] == [("r1", "revoked")]
    assert [r.request_id for r in verdicts.without_outcome] == ["r2"]


def test_a_request_first_seen_or_scheduled_after_the_cutoff_is_pending_not_counted():
    verdicts = requests_without_outcome(
        [RequestSeen("late", "a", 95), RequestSeen("scheduled", "b", 50, not_before=99), RequestSeen("old", "c", 50)],
        set(),
        outcome_id=outcome_event_id,
        outcome_types=(REFRESHED,),
        churn={},
        cutoff=90,
    )
    assert sorted(r.request_id for r in verdicts.pending_at_end) == ["late", "scheduled"]
    assert [r.request_id for r in verdicts.without_outcome] == ["old"]


# Alarms and goals ----------------------------------------------------------------------------------------------


def test_each_systemic_fault_needs_an_alarm_inside_its_window():
    faults = [Window(10, 40, "manager_all_connection_errors"), Window(100, 130, "manager_all_connection_errors")]
    assert [ok for _, ok in alarms_matched(faults, [35.0, 200.0])] == [True, False]


FIGURES = {
    "tokens_expired_while_refreshable": 0,
    "calls_per_token_lifetime": 1.0,
    "requests_without_outcome": 0,
    "pacing_max_10s_over_limit": 1.10,
    "pacing_max_1s_excess_calls": 1,
    "alarms_raised": 1,
    "alarms_expected": 1,
}


def test_figures_at_their_goals_miss_nothing_and_each_figure_past_its_goal_is_named():
    assert missed_goals(FIGURES, alarms_all_matched=True) == []
    for name, value in [
        ("tokens_expired_while_refreshable", 1),
        ("calls_per_token_lifetime", 1.006),
        ("requests_without_outcome", 2),
        ("pacing_max_10s_over_limit", 1.11),
        ("pacing_max_1s_excess_calls", 2),
        ("alarms_raised", 0),
    ]:
        missed = missed_goals(FIGURES | {name: value}, alarms_all_matched=True)
        assert len(missed) == 1 and missed[0].startswith(name), (name, missed)
    assert missed_goals(FIGURES, alarms_all_matched=False)[0].startswith("alarms_raised")


# The plan ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_every_expiry_form_stands_for_the_instant_the_soak_records(form):
    moment = 1_796_535_088.853_912
    value, instant = format_expiry(moment, form)
    assert abs(parse_expires_at(value).timestamp() - instant) < 1e-6, value
    assert 0 <= moment - instant < 1.0


def test_one_seed_gives_one_plan_and_a_long_run_draws_every_fault_class():
    seed = random.Random().randrange(1, 2**31)
    assert make_plan(seed, 50, 600).describe() == make_plan(seed, 50, 600).describe()
    long = make_plan(seed, 50, 900)
    assert long.left_out == [], long.describe()
    assert all(long.warmup_s <= f.at and f.at + f.duration <= long.active_end + 1e-6 for f in long.faults)


def test_after_an_outage_a_token_behind_its_integrations_backlog_at_the_limit_is_excused_one_within_reach_is_not():
    # A 4/s integration: at the end of a fault (96) 40 of its tokens were due and expire sooner than "behind";
    # serving them soonest-first at the limit takes 10 s, and "behind"'s grant was refused 12 s after the fault
    # (8 s + 10 s were needed). With a limit of 10/s it had time (8 s + 4 s) and is counted.
    backlog = [version(f"due-{n}", 100 + n, ended=97 + n / 4, integration="salesforce") for n in range(40)]
    behind = version("behind", 150, integration="salesforce")
    blocked = {"behind": [Window(108, float("inf"), "grant refused (200_failure_body)")]}
    windows = [Window(50, 96, "cosmos_blip_500")]
    at_4 = expired_while_refreshable(
        [*backlog, behind], blocked, windows, until=300, threshold_s=90, need_s=8, limits={"salesforce": 4}
    )
    assert [v.connection_id for v, _ in at_4.excused] == ["behind"]
    at_10 = expired_while_refreshable(
        [*backlog, behind], blocked, windows, until=300, threshold_s=90, need_s=8, limits={"salesforce": 10}
    )
    assert [v.connection_id for v in at_10.expired] == ["behind"]
    unlimited = expired_while_refreshable([*backlog, behind], blocked, windows, until=300, threshold_s=90, need_s=8)
    assert [v.connection_id for v in unlimited.expired] == ["behind"]
