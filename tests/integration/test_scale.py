"""Scale behaviour: continuation of long scans, one client connection per service per process (lean
imports per function module: tests/unit/test_scale.py)."""

import time
from datetime import timedelta

import manager_check_handler
import sync_refresh_handler
from localdev.stand_in_manager import Answer
from shared import runtime
from shared.events import CHECK_EXPIRING, REFRESH_REQUESTED, REFRESHED, CheckExpiringData, CloudEvent, make_event
from shared.times import utc_now
from tests.support.helpers import invoke, iso, trigger
from tests.support.network import established_connections_to


def seed(container, count, prefix="c"):
    now = utc_now()
    for n in range(count):
        container.upsert_item(
            {
                "id": f"{prefix}-{n:05d}",
                "tenantId": f"t-{n % 7}",
                "integrationId": "box",
                "status": "active",
                "oauth": {"expiresAt": iso(now + timedelta(seconds=n))},
            }
        )


def test_a_scan_past_its_time_budget_continues_in_a_follow_up_without_gaps_or_repeats(
    app_env, cosmos_container, event_tap, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_PAGE_SIZE", "7")
    monkeypatch.setenv("TOKEN_REFRESH_CHECK_TIME_BUDGET_MS", "1")  # every page exhausts the budget
    runtime.reset()
    seed(cosmos_container, 60)
    now = utc_now()
    check = make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)))
    invocations = 0
    requested: list[str] = []
    while check is not None:
        invoke(manager_check_handler, trigger(check))
        invocations += 1
        check = None
        for captured in event_tap.drain():
            if captured.routing_key == REFRESH_REQUESTED:
                requested.append(captured.body["data"]["connectionId"])
            elif captured.routing_key == CHECK_EXPIRING:
                follow_up = CloudEvent.model_validate(captured.body)
                assert follow_up.data["thresholdTime"] == iso(now + timedelta(hours=1))
                assert follow_up.data["continuation"]
                check = follow_up
    assert sorted(requested) == [f"c-{n:05d}" for n in range(60)]  # none skipped, none twice
    assert invocations >= 60 // 7


def test_a_check_run_again_hands_off_to_the_same_follow_up_so_one_chain_continues(
    app_env, cosmos_container, event_tap, monkeypatch
):
    # A redelivered check (an error after its hand-off was published) scans again from the same place: its follow-up
    # must carry the same id, so duplicate detection (and anyone counting checks) sees one chain, not two.
    monkeypatch.setenv("TOKEN_REFRESH_PAGE_SIZE", "7")
    monkeypatch.setenv("TOKEN_REFRESH_CHECK_TIME_BUDGET_MS", "1")
    runtime.reset()
    seed(cosmos_container, 20)
    now = utc_now()
    check = make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)))
    follow_ups = []
    for _delivery in range(2):
        invoke(manager_check_handler, trigger(check))
        follow_ups += [c.body for c in event_tap.drain() if c.routing_key == CHECK_EXPIRING]
    assert len(follow_ups) == 2
    assert follow_ups[0]["data"]["continuation"] == follow_ups[1]["data"]["continuation"]
    assert follow_ups[0]["id"] == follow_ups[1]["id"]


def test_a_hundred_invocations_reuse_one_connection_per_service(
    app_env, cosmos_server, cosmos_container, manager, event_tap, rabbitmq
):
    seed(cosmos_container, 100)
    # The test's own client just used pooled keep-alive sockets to seed; the server closes idle ones
    # after 5 s. Wait that out (until this process holds none, at most 10 s) so the count below sees only the app's.
    deadline = time.monotonic() + 10
    while established_connections_to(cosmos_server.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    manager.script = lambda call: Answer(200)
    runtime.reset()
    before = rabbitmq.ctl("list_connections", "client_properties").count("integration-token-refresh")
    now = utc_now()
    invoke(
        manager_check_handler,
        trigger(make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)))),
    )
    requests = [CloudEvent.model_validate(e.body) for e in event_tap.drain() if e.routing_key == REFRESH_REQUESTED]
    cosmos_client = runtime.cosmos_client()
    assert len(requests) == 100
    for request in requests:
        invoke(sync_refresh_handler, trigger(request))
    # Counted at once: rabbitmqctl below takes seconds on a loaded machine, long enough for the server to close
    # the app's idle socket (after 5 s).
    cosmos_connections = established_connections_to(cosmos_server.port)
    assert len(event_tap.of_type(REFRESHED)) == 100
    assert manager.sockets_accepted == 1
    app_connections = rabbitmq.ctl("list_connections", "client_properties").count("integration-token-refresh")
    assert app_connections - before == 1
    # One Cosmos client for all 101 invocations; its pool holds one socket for our requests and, at
    # times, a second one for the SDK's own background endpoint refresh (seen on CI) -- never one per call.
    assert cosmos_connections in (1, 2)
    assert runtime.cosmos_client() is cosmos_client
