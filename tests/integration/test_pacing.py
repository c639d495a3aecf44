"""The check schedules refresh requests (TOKEN_REFRESH_RATE_LIMITS, TOKEN_REFRESH_SPREAD_MS), against
the real Cosmos-compatible server (its ORDER BY, continuation tokens, the pacing documents) and real
RabbitMQ (the events the platform sees, with their notBefore)."""

import logging
import random
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import requests

import manager_check_handler
import sync_refresh_handler
from shared import runtime
from shared.events import CHECK_EXPIRING, REFRESH_REQUESTED, REFRESHED, CheckExpiringData, CloudEvent, make_event
from shared.messaging import ServiceBusTransport
from shared.refresh_schedule import BACKLOG_ALARM
from shared.times import parse_time, utc_now
from tests.support.documents import request_for, seed_connection, seed_expiring
from tests.support.helpers import invoke, most_in_any_window, refresh_request, trigger
from tests.support.service_bus import RecordingClient, RecordingSender


def run_check(event_tap, now=None):
    """One check and every follow-up it hands off to; the refresh requests it published, in order."""
    now = now or datetime.now(UTC)
    pending = [make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(minutes=65)))]
    requests, checks = [], 0
    while pending:
        invoke(manager_check_handler, trigger(pending.pop(0)))
        checks += 1
        for captured in event_tap.drain():
            if captured.routing_key == REFRESH_REQUESTED:
                requests.append(captured.body["data"])
            elif captured.routing_key == CHECK_EXPIRING:
                pending.append(CloudEvent.model_validate(captured.body))
    return requests, checks


def ms(text: str) -> int:
    return round(parse_time(text).timestamp() * 1000)


def summary_line(caplog) -> str:
    return [r.getMessage() for r in caplog.records if "Check-expiring run finished" in r.getMessage()][-1]


def test_the_schedule_holds_each_limit_soonest_expiring_first_across_pages_and_follow_up_checks(
    app_env, cosmos_container, event_tap, monkeypatch
):
    # Pages of 7 and a time budget of 1 ms: every page is a follow-up check of its own.
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "salesforce=20/s,*=50/s")
    monkeypatch.setenv("TOKEN_REFRESH_PAGE_SIZE", "7")
    monkeypatch.setenv("TOKEN_REFRESH_CHECK_TIME_BUDGET_MS", "1")
    runtime.reset()
    now = datetime.now(UTC).replace(microsecond=0)
    plan = [(f"sf-{n}", "salesforce", now + timedelta(minutes=10, seconds=n)) for n in range(40)]
    plan += [(f"hs-{n}", "hubspot", now + timedelta(minutes=5, seconds=n)) for n in range(30)]
    random.Random(3).shuffle(plan)  # stored in no particular order: only the query's ORDER BY sorts them
    for connection_id, integration, expires_at in plan:
        seed_expiring(cosmos_container, connection_id, expires_at, integration)

    requests, checks = run_check(event_tap)

    assert checks >= 10  # the schedule went on across follow-up checks
    assert Counter(r["connectionId"] for r in requests) == Counter(c for c, _, _ in plan)  # each exactly once
    by_integration = defaultdict(list)
    for request in requests:
        by_integration[request["integrationId"]].append(request)
    for integration, limit in (("salesforce", 20), ("hubspot", 50)):
        paced = by_integration[integration]
        times = [ms(r["notBefore"]) for r in paced]
        assert most_in_any_window(times, 1000) <= limit
        in_time_order = [r["expiresAt"] for r in sorted(paced, key=lambda r: ms(r["notBefore"]))]
        assert in_time_order == sorted(in_time_order)  # soonest-expiring first, across pages and checks
        gaps = [b - a for a, b in zip(sorted(times), sorted(times)[1:], strict=False)]
        assert min(gaps) >= 1000 // limit - 1


def test_a_check_while_an_earlier_schedule_runs_adds_only_new_requests_after_it(
    app_env, cosmos_container, event_tap, monkeypatch, caplog
):
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "*=2/s")
    runtime.reset()
    now = datetime.now(UTC)
    for n in range(20):  # 10 s of requests at 2/s
        seed_expiring(cosmos_container, f"wave-{n}", now + timedelta(minutes=30, seconds=n))
    first, _ = run_check(event_tap)
    assert len(first) == 20
    last_of_wave = max(ms(r["notBefore"]) for r in first)

    seed_expiring(cosmos_container, "newcomer", now + timedelta(minutes=40))
    with caplog.at_level(logging.INFO):
        second, _ = run_check(event_tap)
    assert [r["connectionId"] for r in second] == ["newcomer"]
    assert ms(second[0]["notBefore"]) >= last_of_wave + 500  # after the wave, at the limit
    assert "found=1 " in summary_line(caplog) and "waiting=20 " in summary_line(caplog)


def test_a_new_or_reconnected_connection_is_not_held_back_by_an_earlier_backlog(
    app_env, cosmos_container, event_tap, monkeypatch, caplog
):
    # Was: every token expiring before the earlier schedule's reach counted as already scheduled (WAITING): a
    # reconnected connection and a new one due before the backlog's end were not requested at all.
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "*=2/s")
    runtime.reset()
    now = datetime.now(UTC)
    for n in range(40):  # 20 s of requests at 2/s, tokens expiring in 30 minutes
        seed_expiring(cosmos_container, f"wave-{n}", now + timedelta(minutes=30, seconds=n))
    first, _ = run_check(event_tap)
    assert len(first) == 40
    wave_ends = max(ms(r["notBefore"]) for r in first)

    seed_expiring(cosmos_container, "wave-3", now + timedelta(minutes=30, seconds=3, milliseconds=500))  # reconnected
    # New, due so soon that the backlog's end (+20 s) would be past its window (expiry minus the 5-minute margin).
    seed_expiring(cosmos_container, "urgent", now + timedelta(minutes=5, seconds=10))
    with caplog.at_level(logging.INFO):
        second, _ = run_check(event_tap)
    assert sorted(r["connectionId"] for r in second) == ["urgent", "wave-3"]
    urgent = next(r for r in second if r["connectionId"] == "urgent")
    assert ms(urgent["notBefore"]) < wave_ends - 10_000  # ahead of the backlog, not after it
    assert "waiting=39 " in summary_line(caplog)  # the rest of the wave: exactly the requests still scheduled


def test_tokens_the_limit_cannot_reach_in_time_are_still_scheduled_counted_and_warned_about(
    app_env, cosmos_container, event_tap, monkeypatch, caplog
):
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "salesforce=2/s")
    runtime.reset()
    now = datetime.now(UTC)
    for n in range(30):  # 15 s of requests at 2/s; the tokens expire within 6 s
        seed_expiring(cosmos_container, f"late-{n}", now + timedelta(seconds=3 + n * 0.1))
    with caplog.at_level(logging.INFO):
        requests, _ = run_check(event_tap, now)
    assert len(requests) == 30
    late = [r for r in requests if ms(r["notBefore"]) > ms(r["expiresAt"])]
    assert late  # scheduled anyway, as early as the limit allows
    [warning] = [r for r in caplog.records if getattr(r, "alarm", None) == BACKLOG_ALARM]
    assert (warning.pacedIntegration, warning.scheduled, warning.late) == ("salesforce", 30, len(late))
    assert f"late={len(late)})" in summary_line(caplog)


def test_without_limits_or_spread_every_request_is_due_at_once_as_before(app_env, cosmos_container, event_tap):
    now = datetime.now(UTC)
    for n in range(5):
        seed_expiring(cosmos_container, f"c-{n}", now + timedelta(minutes=10))
    requests, _ = run_check(event_tap)
    assert len(requests) == 5
    assert all("notBefore" not in r for r in requests)


def test_the_spread_delays_requests_within_the_window_and_never_the_urgent_ones(
    app_env, cosmos_container, event_tap, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_SPREAD_MS", "600000")
    runtime.reset()
    now = datetime.now(UTC)
    for n in range(30):
        seed_expiring(cosmos_container, f"later-{n}", now + timedelta(minutes=60))
    seed_expiring(cosmos_container, "expired", now - timedelta(minutes=1))
    seed_expiring(cosmos_container, "in-the-margin", now + timedelta(minutes=3))
    requests = {r["connectionId"]: r for r in run_check(event_tap, now)[0]}
    for urgent in ("expired", "in-the-margin"):  # undelayed
        assert ms(requests[urgent]["notBefore"]) - now.timestamp() * 1000 < 5_000
    delays = [ms(requests[f"later-{n}"]["notBefore"]) - now.timestamp() * 1000 for n in range(30)]
    assert all(0 <= d <= 600_000 + 1000 for d in delays)
    assert len({int(d // 60_000) for d in delays}) >= 5  # spread over the window, not bunched


# Pacing at call time (shared.token_refresh._wait_for_call_slot) ---------------------------------------------------


def test_requests_delivered_all_at_once_keep_the_rate_limit_at_call_time(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    # Requests delivered late (the host or RabbitMQ down for a while, a 429 storm) all arrive at once; nothing at call
    # time kept the limit: 42-60 calls in 1 s at salesforce=4/s. Now each call takes the integration's next free slot
    # in the state container (every host shares it), waits for it, or comes back for it as a scheduled copy.
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "zoom=4/s")
    runtime.reset()
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    requests = [request_for(f"c-{n}", seed_connection(cosmos_container, f"c-{n}")) for n in range(16)]
    with ThreadPoolExecutor(16) as pool:  # every request at once, as after an outage
        list(pool.map(lambda request: invoke(sync_refresh_handler, trigger(request, 1)), requests))
    delivered = 0
    while scheduled := client.senders.get(REFRESH_REQUESTED, RecordingSender("", 0)).scheduled[delivered:]:
        delivered += len(scheduled)
        for message, at in sorted(scheduled, key=lambda copy: copy[1]):  # each at its time, as Service Bus does
            time.sleep(max(0.0, (at - utc_now()).total_seconds()))
            invoke(sync_refresh_handler, trigger(b"".join(message.body), 1, message_id=message.message_id))
    assert len(event_tap.of_type(REFRESHED)) == 16
    assert len(manager.calls) == 16  # each once: a paced copy is no retry
    stamps = [call.received_at for call in manager.calls]
    assert most_in_any_window(stamps, 1.0) <= 4 + 1
    assert most_in_any_window(stamps, 3.0) <= 4 * 3 + 1
    assert delivered > 0  # some came back later: the slots were further off than a delivery may wait (2.5 s)


def test_a_call_slot_costs_a_limited_integration_one_read_and_one_write_of_cosmos_per_refresh(
    app_env, cosmos_container, manager, event_tap, monkeypatch
):
    # 2/s: slots ~0.55 s apart, so taking one (a read and a write) never takes long enough to miss it, even on a
    # loaded machine, and be retaken (which would cost another read and write).
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "zoom=2/s")
    runtime.reset()
    counted: list[str] = []
    send = requests.Session.send

    def counting_send(session, request, **kwargs):  # the app's requests to Cosmos, as bench/run.py counts them
        if request.url.startswith(app_env["COSMOS_ENDPOINT"]):
            counted.append(request.url)
        return send(session, request, **kwargs)

    def cosmos_requests_per_refresh(integration_id: str) -> float:
        seeded = [f"{integration_id}-{n}" for n in range(5)]
        requests_ = [
            refresh_request(
                connection_id,
                integration_id,
                "t-1",
                seed_connection(cosmos_container, connection_id, integrationId=integration_id),
            )
            for connection_id in seeded
        ]
        invoke(sync_refresh_handler, trigger(requests_[0], 1))  # warm: clients, containers, the slot document
        counted.clear()
        for request in requests_[1:]:
            invoke(sync_refresh_handler, trigger(request, 1))
        return len(counted) / (len(requests_) - 1)

    monkeypatch.setattr(requests.Session, "send", counting_send)
    unlimited = cosmos_requests_per_refresh("github")
    limited = cosmos_requests_per_refresh("zoom")
    assert limited - unlimited == 2  # the slot document: one point read, one etag-guarded replace
    assert len(event_tap.of_type(REFRESHED)) == 10
