"""Exactly one refresh and at least one outcome, through the local host (`python -m localdev run`):
scenarios that once broke the guarantees (issue #10) and need the app running as a program: a RabbitMQ
heartbeat shorter than an invocation, a manager outage longer than immediate redeliveries. The
scenarios in process: tests/integration/test_refresh_guarantees.py."""

import subprocess
import threading
import time
from datetime import timedelta

from localdev.stand_in_manager import Answer
from shared.events import REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED
from tests.support.documents import seed_connection
from tests.support.event_taps import of_type
from tests.support.helpers import APP_ROOT, CLI, run_cli


def test_a_heartbeat_shorter_than_an_invocation_is_raised_to_outlast_it(
    fault_env,
    cosmos_container,
    manager,
    tap,
    rabbitmq,
    tmp_path,
):
    # A consumer runs the invocation on its connection's thread: no heartbeat goes out meanwhile. With
    # ?heartbeat=2 and a longer call, RabbitMQ could close the connection and hand the message to
    # another worker mid-refresh. The local host's connections negotiate at least the longest invocation.
    seed_connection(cosmos_container)
    listed = threading.Event()

    def call_outlasting_the_heartbeat_and_the_listing(call):
        # At least 4 s (two heartbeats of 2 s), and until the connections are listed: rabbitmqctl takes seconds on a
        # loaded machine, and once the call returns the cycle ends and the host closes its connections.
        started = time.monotonic()
        listed.wait(10)
        time.sleep(max(0.0, 4 - (time.monotonic() - started)))
        return Answer(200)

    manager.script = call_outlasting_the_heartbeat_and_the_listing
    env = fault_env | {
        "RABBITMQ_URL": fault_env["RABBITMQ_URL"] + "?heartbeat=2",
        "INTEGRATION_MANAGER_TIMEOUT_MS": "15000",
    }
    log = tmp_path / "host.log"
    with log.open("w") as output:
        host = subprocess.Popen(
            [*CLI, "run", "--once", "--queue-prefix", env["FAULT_QUEUE_PREFIX"], "--workers", "2"],
            cwd=APP_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not manager.calls and time.monotonic() < deadline:
            time.sleep(0.1)
        assert manager.calls, log.read_text()[-3000:]
        # While the call runs: the consumers' connections (the publisher's, named integration-token-refresh, only
        # publishes: if the broker drops it, the next publish reconnects) and the test's own tap (the broker's 60 s).
        connections = rabbitmq.ctl("list_connections", "timeout", "client_properties").splitlines()[2:]
        listed.set()
        assert host.wait(60) == 0, log.read_text()[-3000:]
    finally:
        listed.set()
        host.kill()
    consumers = [int(line.split()[0]) for line in connections if '"integration-token-refresh"' not in line]
    assert len(consumers) >= 3 and min(consumers) >= 60, (connections, log.read_text()[-4000:])
    assert "RabbitMQ heartbeat 2 s is shorter than the longest invocation" in log.read_text()
    assert len(manager.calls) == 1
    assert [e.routing_key for e in tap.everything() if e.routing_key in (REFRESHED, REFRESH_FAILED)] == [REFRESHED]


def test_a_manager_outage_longer_than_immediate_redeliveries_ends_refreshed(
    fault_env,
    cosmos_container,
    manager,
    tap,
):
    # Was: the deliveries of the requests in flight were used up within a second; they ended
    # refresh.failed (retryable) and waited for the next check, an hour later. Now each retry is a
    # scheduled copy, 0.7 s, 1.4 s, 2.8 s later: an outage of 2.5 s from the requests' publishing is ridden out.
    for n in range(3):
        seed_connection(cosmos_container, f"c-{n}")
    manager.container, manager.token_lifetime = cosmos_container, timedelta(hours=3)
    env = fault_env | {"TOKEN_REFRESH_MAX_DELIVERY_COUNT": "4", "TOKEN_REFRESH_RETRY_DELAY_MS": "700"}
    manager.refuse_connections()
    outage = {}

    def end_the_outage_after_the_requests() -> None:
        # Timed from the requests, not from the start: a loaded machine may take seconds to start the program.
        outage["requested"] = tap.wait_for(lambda events: len(of_type(events, REFRESH_REQUESTED)) >= 3, timeout=30)
        time.sleep(2.5)
        outage["ended_at"] = time.monotonic()
        manager.accept_connections()

    ender = threading.Thread(target=end_the_outage_after_the_requests, daemon=True)
    ender.start()
    result = run_cli(env, "run", "--once", "--queue-prefix", env["FAULT_QUEUE_PREFIX"])
    ender.join(35)
    assert outage["requested"] and result.returncode == 0, result.stderr[-3000:]
    assert "Cycle finished: found 3, refreshed 3, failed 0, dead-lettered 0" in result.stdout, result.stdout
    assert result.stderr.count("OAuth token refresh will be retried in") >= 3
    outcomes = [e for e in tap.everything() if e.routing_key in (REFRESHED, REFRESH_FAILED)]
    assert sorted(e.body["data"]["connectionId"] for e in outcomes) == ["c-0", "c-1", "c-2"]
    assert {e.routing_key for e in outcomes} == {REFRESHED}
    assert all(call.received_at >= outage["ended_at"] for call in manager.calls)  # refused ones never arrived
