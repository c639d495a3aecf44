"""Faults against the real services, driven through `python -m localdev run` / `run --once`.

Each scenario breaks one dependency in the middle of a cycle (RabbitMQ restarted, integration-manager
refusing connections, hanging, rate limiting or failing in bursts, the Cosmos-compatible server
stopped mid-scan, the local host SIGKILLed) and then checks the promise of docs/failure-handling.md:

- no event is lost: events are captured on a durable queue (it outlives a broker restart), every
  refresh request of a cycle ends with a `refreshed` or `refresh.failed` event, and the CLI's
  cycle summary counts exactly the outcome events that were captured;
- every expiring connection ends refreshed (its `oauth.expiresAt` moved forward, a `refreshed`
  event) or with a `refresh.failed` event, and the next cycle after recovery catches everything up;
- nothing is refreshed twice: one successful refresh call per connection and `expiresAt` (the
  stand-in manager refreshes by moving `oauth.expiresAt` in Cosmos and records every call).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from azure.cosmos import CosmosClient, PartitionKey

from localdev.errors import BrokerUnavailableError
from localdev.local_host import LocalHost
from localdev.local_services import CosmosServer, free_port
from localdev.stand_in_manager import Answer, Call
from shared import runtime
from shared.events import REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED
from shared.settings import load_settings
from shared.state_store import StateStore
from shared.times import parse_expires_at
from tests.support.event_taps import CapturedEvent, of_type
from tests.support.helpers import iso, run_cli
from tests.support.host_process import Host, fault_args

pytestmark = pytest.mark.timeout(60)

CYCLE = re.compile(r"Cycle finished: found (\d+), refreshed (\d+), failed (\d+), dead-lettered (\d+)")
OUTCOMES = (REFRESHED, REFRESH_FAILED)


# The fleet -----------------------------------------------------------------------------------------


@dataclass
class Fleet:
    due: dict[str, dict]  # connection id -> document as seeded
    not_due: dict[str, dict]

    @property
    def documents(self) -> list[dict]:
        return [*self.due.values(), *self.not_due.values()]


def seed_fleet(container: Any, due: int = 12, not_due: int = 2) -> Fleet:
    """`due` connections expiring within the threshold (ISO strings and epoch ms), `not_due` later."""
    now = datetime.now(UTC)
    fleet = Fleet({}, {})
    for n in range(due + not_due):
        expiry = now + (timedelta(minutes=n % 50) if n < due else timedelta(days=2))
        document = {
            "id": f"{'due' if n < due else 'later'}-{n:03d}",
            "tenantId": f"tenant-{n % 3}",
            "integrationId": ("google", "slack", "hubspot")[n % 3],
            "status": "active",
            "oauth": {
                "accessToken": f"at-{n}",
                "refreshToken": f"rt-{n}",
                "expiresAt": int(expiry.timestamp() * 1000) if n % 4 == 3 else iso(expiry),
            },
        }
        (fleet.due if n < due else fleet.not_due)[document["id"]] = document
    for document in fleet.documents:
        container.upsert_item(document)
    return fleet


# Running the app ------------------------------------------------------------------------------------


@dataclass
class Cycle:
    returncode: int
    stdout: str
    stderr: str
    found: int = -1
    refreshed: int = -1
    failed: int = -1
    dead_lettered: int = -1

    @classmethod
    def parse(cls, returncode: int, stdout: str, stderr: str) -> Cycle:
        cycle = cls(returncode, stdout, stderr)
        if match := CYCLE.search(stdout):
            cycle.found, cycle.refreshed, cycle.failed, cycle.dead_lettered = map(int, match.groups())
        return cycle

    def counts(self) -> tuple[int, int, int, int]:
        return self.found, self.refreshed, self.failed, self.dead_lettered

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-2000:]}\n--- log\n{log_lines(self.stderr)}"


def log_lines(output: str, last: int = 60) -> str:
    """The app's own log lines (not the tracebacks that come with some of them), the last `last` ones."""
    lines = [line for line in output.splitlines() if re.match(r"\d{4}-\d\d-\d\d |error:|Cycle finished", line)]
    return "\n".join(line[:300] for line in lines[-last:])


def run_once(env: dict, timeout: float = 40) -> Cycle:
    result = run_cli(env, "run", "--once", *fault_args(env), timeout=timeout)
    return Cycle.parse(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def hosts(tmp_path):
    started: list[Host] = []

    def start(env: dict, *args: str) -> Host:
        host = Host(env, tmp_path, *args)
        started.append(host)
        return host

    yield start
    for host in started:
        host.kill()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# What must hold after every fault -------------------------------------------------------------------


def connection_ids(events: list[CapturedEvent], *types: str) -> set[str]:
    return {body["data"]["connectionId"] for body in of_type(events, *types)}


def assert_no_event_lost(events: list[CapturedEvent], cycle: Cycle | None = None) -> None:
    """Every refresh request of the cycle has an outcome event; copies of an outcome event
    (at-least-once delivery) are identical; the CLI summary counts each outcome once."""
    requested = connection_ids(events, REFRESH_REQUESTED)
    with_outcome = connection_ids(events, *OUTCOMES)
    assert requested - with_outcome == set(), "refresh requested, but no refreshed/refresh.failed event"
    by_id: dict[str, dict] = {}
    for body in of_type(events, *OUTCOMES):  # (a refresh request's id is the same in every check)
        assert by_id.setdefault(body["id"], body) == body, "two different outcome events, one id"
    if cycle is not None:
        outcome_ids = {body["id"] for body in of_type(events, *OUTCOMES)}
        assert cycle.refreshed + cycle.failed == len(outcome_ids), cycle.explain()


def refreshing_calls(calls: list[Call]) -> dict[str, list[Call]]:
    by_connection: dict[str, list[Call]] = {}
    for call in calls:
        if call.refreshed:
            by_connection.setdefault(call.connection_id, []).append(call)
    return by_connection


def assert_nothing_refreshed_twice(calls: list[Call]) -> None:
    """One successful refresh call per connection and expiresAt. Every connection is due for one
    expiresAt only (a refresh moves it past the threshold), so: one refreshing call per connection."""
    twice = {
        connection: [(c.refreshed_from, c.refreshed_to) for c in refreshed]
        for connection, refreshed in refreshing_calls(calls).items()
        if len(refreshed) > 1
    }
    assert twice == {}, "connections refreshed more than once for the same expiring token"


def assert_all_refreshed(container: Any, fleet: Fleet, events: list[CapturedEvent], calls: list[Call]) -> None:
    """Every due connection ends refreshed: its expiresAt moved forward and a `refreshed` event says
    so; nothing that was not due was called."""
    threshold = datetime.now(UTC) + timedelta(hours=1)
    stale = []
    for connection_id, seeded in fleet.due.items():
        current = container.read_item(connection_id, partition_key=seeded["tenantId"])["oauth"]["expiresAt"]
        if parse_expires_at(current) <= threshold:
            stale.append(connection_id)
    assert stale == [], "due connections whose token was not refreshed"
    assert set(fleet.due) - connection_ids(events, REFRESHED) == set(), "refreshed without a refreshed event"
    assert {c.connection_id for c in calls} <= set(fleet.due), "a connection that was not due was called"


def last_outcomes(events: list[CapturedEvent]) -> dict[str, dict]:
    outcome: dict[str, dict] = {}
    for body in of_type(events, *OUTCOMES):
        outcome[body["data"]["connectionId"]] = body
    return outcome


def numbered(script: Callable[[int, Call], Answer]) -> Callable[[Call], Answer]:
    """A stand-in script that also gets the call's number (1, 2, ...) across all connections."""
    counter = itertools.count(1)
    lock = threading.Lock()

    def answer(call: Call) -> Answer:
        with lock:
            number = next(counter)
        return script(number, call)

    return answer


# 1. RabbitMQ restarted in the middle of a cycle ----------------------------------------------------


class BrokerRestart:
    """Restarts the session broker from a thread: stop (the app's connections drop), then start."""

    def __init__(self, rabbitmq: Any):
        self.rabbitmq = rabbitmq
        self.down = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="broker-restart", daemon=True)

    def _run(self) -> None:
        try:
            self.rabbitmq.stop()
            self.down.set()
            self.rabbitmq.start()
        except BaseException as error:  # noqa: BLE001 - re-raised by join()
            self.error = error
            self.down.set()

    def begin_and_wait_until_down(self, timeout: float = 30) -> None:
        self._thread.start()
        self.down.wait(timeout)

    def join(self, timeout: float = 60) -> None:
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error


@pytest.fixture
def restart_broker_on_call(rabbitmq):
    """`restart_broker_on_call(n)` -> (restart, script): a stand-in script that, on call n, stops the
    broker before answering 200 (the refresh succeeds; publishing its outcome meets a broker that is
    gone) and starts it again. The session broker is shared: whatever happens, it runs afterwards."""
    restarts: list[BrokerRestart] = []

    def arm(at_call: int) -> tuple[BrokerRestart, Callable[[Call], Answer]]:
        restart = BrokerRestart(rabbitmq)
        restarts.append(restart)

        def script(number: int, call: Call) -> Answer:
            if number == at_call:
                restart.begin_and_wait_until_down()
            return Answer(200)

        return restart, numbered(script)

    yield arm
    for restart in restarts:
        with contextlib.suppress(Exception):
            restart.join()
    if not rabbitmq.is_ready():
        rabbitmq.stop()
        rabbitmq.start()


def test_rabbitmq_restart_mid_cycle_run_once_reconnects_and_finishes_the_cycle(
    fault_env, restart_broker_on_call, cosmos_container, manager, tap
):
    fleet = seed_fleet(cosmos_container, due=12)
    restart, manager.script = restart_broker_on_call(5)

    cycle = run_once(fault_env)
    restart.join()

    assert cycle.returncode == 0, cycle.explain()
    assert "RabbitMQ connection lost" in cycle.stderr and "Connected to RabbitMQ again" in cycle.stderr
    assert cycle.counts() == (12, 12, 0, 0), cycle.explain()
    events = tap.drain()
    assert_no_event_lost(events, cycle)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)

    # The next cycle has nothing left to catch up.
    after = run_once(fault_env)
    assert after.counts() == (0, 0, 0, 0), after.explain()


def test_rabbitmq_restart_while_running_reconnects_and_keeps_consuming(
    fault_env, restart_broker_on_call, cosmos_container, manager, tap, hosts
):
    fleet = seed_fleet(cosmos_container, due=12)
    restart, manager.script = restart_broker_on_call(5)

    host = hosts(fault_env | {"TOKEN_REFRESH_INTERVAL_MS": "1000"})
    everything_reported = wait_until(lambda: set(fleet.due) <= connection_ids(tap.everything(), REFRESHED), timeout=25)
    restart.join()
    assert host.interrupt() == 0, log_lines(host.output())
    output = host.output()
    assert everything_reported, log_lines(output)
    assert "RabbitMQ connection lost" in output and "Connected to RabbitMQ again" in output
    assert_no_event_lost(tap.events)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, tap.events, manager.calls)


def test_run_once_without_a_broker_stops_with_one_line_and_exit_1(fault_env):
    port = free_port()
    cycle = run_once(fault_env | {"RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{port}/%2F"})
    assert cycle.returncode == 1, cycle.explain()
    assert "Traceback" not in cycle.stderr, cycle.stderr
    last = cycle.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot use RabbitMQ at 127.0.0.1:{port} (AMQPConnectionError"), cycle.stderr
    assert "fix RABBITMQ_URL" in last


def test_run_once_gives_up_in_one_line_when_the_broker_stays_away_and_the_next_run_finishes(
    fault_env, restart_broker_on_call, cosmos_container, manager, tap
):
    """`run --once` waits for the broker up to LocalHost.reconnect_timeout_s (60 s); here 1 s, shorter
    than a restart: the cycle stops with one line, and what it left queued is done by the next run."""
    fleet = seed_fleet(cosmos_container, due=4)
    restart, manager.script = restart_broker_on_call(2)
    host = LocalHost(load_settings(), queue_prefix=fault_env["FAULT_QUEUE_PREFIX"], reconnect_timeout_s=1.0)
    try:
        with pytest.raises(BrokerUnavailableError) as stopped:
            host.run_once()
    finally:
        host.close()
        runtime.reset()
        restart.join()
    message = str(stopped.value)
    assert message.startswith("RabbitMQ connection lost during the cycle and not back within 1 s (")
    assert "\n" not in message and "unfinished messages stay queued for the next run" in message

    after = run_once(fault_env)  # the same queues: it picks up what was left
    assert after.returncode == 0, after.explain()
    events = tap.everything()
    assert_no_event_lost(events)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)


# 2. integration-manager refusing connections, then back ------------------------------------------


def test_manager_refusing_connections_then_back_is_caught_up_by_the_next_cycle(
    fault_env, cosmos_container, manager, tap
):
    fleet = seed_fleet(cosmos_container, due=10)

    def script(number: int, call: Call) -> Answer:
        if number == 5:
            manager.refuse_connections()  # goes down while answering: this call gets no answer
            return Answer(503)
        return Answer(200)

    manager.script = numbered(script)
    first = run_once(fault_env)
    assert first.returncode == 0, first.explain()
    assert first.counts() == (10, 4, 6, 0), first.explain()
    events = tap.drain()
    assert_no_event_lost(events, first)
    failed = of_type(events, REFRESH_FAILED)
    assert {(f["data"]["error"]["code"], f["data"]["retryable"], f["data"]["attempts"]) for f in failed} == {
        ("network_error", True, 6)
    }
    assert len(manager.calls) == 5  # nothing reached it while the port was closed

    manager.accept_connections()
    second = run_once(fault_env)
    assert second.returncode == 0, second.explain()
    events_after = tap.drain()
    assert connection_ids(events_after, REFRESHED) == connection_ids(events, REFRESH_FAILED)
    assert second.counts() == (6, 6, 0, 0), second.explain()
    assert_no_event_lost(events_after, second)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, tap.events, manager.calls)


# 3. integration-manager hanging past the read timeout ---------------------------------------------


def hang_first_call_of(victim: str, hang_s: float, *, refresh_while_hanging: bool) -> Callable[[Call], Answer]:
    """The victim's first call hangs past the read timeout. With `refresh_while_hanging` the manager
    finishes the refresh and only the answer is late (a slow provider); without, it gives up (504)."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def script(call: Call) -> Answer:
        with lock:
            seen[call.connection_id] += 1
            first = seen[call.connection_id] == 1
        if call.connection_id != victim or not first:
            return Answer(200)
        if refresh_while_hanging:
            return Answer(200, delay_s=hang_s)  # refreshed in Cosmos, then the answer waits
        time.sleep(hang_s)
        return Answer(504, {"error": "upstream_timeout"})

    return script


def test_a_call_hanging_past_the_read_timeout_is_retried_and_refreshed_once(fault_env, cosmos_container, manager, tap):
    fleet = seed_fleet(cosmos_container, due=6)
    victim = sorted(fleet.due)[2]
    manager.script = hang_first_call_of(victim, 1.5, refresh_while_hanging=False)

    cycle = run_once(fault_env | {"INTEGRATION_MANAGER_TIMEOUT_MS": "300"})
    assert cycle.returncode == 0, cycle.explain()
    assert cycle.counts() == (6, 6, 0, 0), cycle.explain()
    victim_calls = [c for c in manager.calls if c.connection_id == victim]
    assert len(victim_calls) == 2 and victim_calls[1].status == 200
    # It gave up at the read timeout (0.3 s), then waited INTEGRATION_MANAGER_IN_FLIGHT_MS (2 s) and looked
    # again before calling: the hanging call (1.5 s) was over, never two calls at once.
    assert victim_calls[1].received_at - victim_calls[0].received_at >= 0.3 + 2.0
    events = tap.drain()
    assert last_outcomes(events)[victim]["data"].get("expiresAt")
    assert_no_event_lost(events, cycle)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)


def test_a_refresh_that_completes_after_the_read_timeout_is_not_done_again(fault_env, cosmos_container, manager, tap):
    fleet = seed_fleet(cosmos_container, due=6)
    victim = sorted(fleet.due)[2]
    manager.script = hang_first_call_of(victim, 1.5, refresh_while_hanging=True)

    cycle = run_once(fault_env | {"INTEGRATION_MANAGER_TIMEOUT_MS": "300"})
    assert cycle.returncode == 0, cycle.explain()
    events = tap.drain()
    assert_no_event_lost(events, cycle)
    # The timed-out call did refresh the token; calling again would refresh the same token twice
    # (docs/failure-handling.md: one successful call per connection and expiresAt).
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)


# 4. 429 with Retry-After, then 200 ----------------------------------------------------------------


def gaps_after_429(calls: list[Call], connection_id: str) -> list[float]:
    mine = [c for c in calls if c.connection_id == connection_id]
    return [later.received_at - earlier.received_at for earlier, later in itertools.pairwise(mine)]


def test_429_with_retry_after_is_waited_out_then_the_refresh_succeeds(fault_env, cosmos_container, manager, tap):
    fleet = seed_fleet(cosmos_container, due=6)
    seconds, http_date = sorted(fleet.due)[1], sorted(fleet.due)[4]
    answered: Counter[str] = Counter()

    def script(call: Call) -> Answer:
        answered[call.connection_id] += 1
        if answered[call.connection_id] == 1 and call.connection_id == seconds:
            return Answer(429, {"error": "rate_limited"}, headers={"Retry-After": "1"})
        if answered[call.connection_id] == 1 and call.connection_id == http_date:
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
            return Answer(429, {"error": "rate_limited"}, headers={"Retry-After": when})
        return Answer(200)

    manager.script = script
    cycle = run_once(fault_env)
    assert cycle.returncode == 0, cycle.explain()
    assert cycle.counts() == (6, 6, 0, 0), cycle.explain()
    [gap] = gaps_after_429(manager.calls, seconds)
    assert 1.0 <= gap < 3.0  # "Retry-After: 1" honoured, not the 5 ms back-off
    [gap] = gaps_after_429(manager.calls, http_date)
    assert 0.9 <= gap < 4.0  # an HTTP date ~2 s ahead (one-second resolution)
    events = tap.drain()
    for connection_id in (seconds, http_date):
        outcome = last_outcomes(events)[connection_id]
        assert (outcome["type"], outcome["data"].get("expiresAt") is not None) == (REFRESHED, True)
    assert_no_event_lost(events, cycle)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)


def test_retry_after_of_the_last_call_of_a_delivery_is_honoured_by_the_redelivery(
    fault_env, cosmos_container, manager, tap
):
    fleet = seed_fleet(cosmos_container, due=3)
    limited = sorted(fleet.due)[1]
    answered: Counter[str] = Counter()

    def script(call: Call) -> Answer:
        answered[call.connection_id] += 1
        if call.connection_id == limited and answered[limited] <= 2:  # both calls of delivery 1
            return Answer(429, {"error": "rate_limited"}, headers={"Retry-After": "1"})
        return Answer(200)

    manager.script = script
    cycle = run_once(fault_env)
    assert cycle.returncode == 0, cycle.explain()
    gaps = gaps_after_429(manager.calls, limited)
    assert len(gaps) == 2
    # Call 3 is the redelivery's first call: it must not come before the callee said (1 s).
    assert min(gaps) >= 1.0, f"calls after a 429 with Retry-After: 1 came after {gaps} s"
    events = tap.drain()
    assert_no_event_lost(events, cycle)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, events, manager.calls)


# 5. Bursts of 5xx, then recovery --------------------------------------------------------------------


def test_bursts_of_5xx_end_refreshed_or_failed_and_the_next_cycle_catches_up(fault_env, cosmos_container, manager, tap):
    fleet = seed_fleet(cosmos_container, due=12)
    bursts = {**dict.fromkeys(range(1, 9), 503), **dict.fromkeys(range(13, 16), 500), 16: 502, 17: 504}

    def script(number: int, call: Call) -> Answer:
        status = bursts.get(number)
        return Answer(status, {"message": "upstream unavailable"}) if status else Answer(200)

    manager.script = numbered(script)
    # Redelivered at once (no scheduled retries): the bursts can use up a connection's deliveries.
    fault_env = fault_env | {"TOKEN_REFRESH_RETRY_DELAY_MS": "0"}
    first = run_once(fault_env)
    assert first.returncode == 0, first.explain()
    events = tap.drain()
    assert_no_event_lost(events, first)
    assert first.found == 12 and first.dead_lettered == 0, first.explain()

    # Each connection's outcome follows from what the stand-in answered it.
    outcomes = last_outcomes(events)
    failed = set()
    for connection_id in fleet.due:
        statuses = [c.status for c in manager.calls if c.connection_id == connection_id]
        data = outcomes[connection_id]["data"]
        if 200 in statuses:
            assert outcomes[connection_id]["type"] == REFRESHED, (connection_id, statuses)
            assert statuses.index(200) == len(statuses) - 1
        else:
            failed.add(connection_id)
            assert len(statuses) == 6, (connection_id, statuses)  # 2 calls x 3 deliveries
            assert (data["retryable"], data["attempts"], data["error"]["httpStatus"]) == (True, 6, statuses[-1])
    assert failed, "the bursts were meant to exhaust at least one connection's deliveries"
    assert (first.refreshed, first.failed) == (12 - len(failed), len(failed)), first.explain()

    # Recovered: the next cycle refreshes what failed (retryable), and nothing else.
    second = run_once(fault_env)
    assert second.returncode == 0, second.explain()
    events_after = tap.drain()
    assert_no_event_lost(events_after, second)
    assert second.counts() == (len(failed), len(failed), 0, 0), second.explain()
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, tap.events, manager.calls)


# 6. The Cosmos-compatible server stopped mid-scan ---------------------------------------------------


@dataclass
class OwnCosmos:
    """A Cosmos-compatible server of this test's own (the session one is shared): it keeps data in
    memory only, so an outage that ends = restart on the same port + the same data provisioned again."""

    server: CosmosServer
    connections_name: str
    state_name: str

    def provision(self, documents: list[dict]) -> Any:
        client = CosmosClient(self.server.endpoint, credential=self.server.key)
        database = client.create_database_if_not_exists("integrations")
        container = database.create_container_if_not_exists(self.connections_name, PartitionKey("/tenantId"))
        StateStore.ensure_container(database, self.state_name)
        for document in documents:
            container.upsert_item(document)
        return container


@pytest.fixture
def own_cosmos(tmp_path):
    cosmos = OwnCosmos(CosmosServer(tmp_path / "cosmos"), "connections_fault", "state_fault")
    cosmos.server.start()
    yield cosmos
    cosmos.server.stop()


def test_cosmos_outage_mid_scan_is_waited_out_and_the_check_runs_again_when_cosmos_is_back(
    fault_env, own_cosmos, manager, tap, hosts
):
    server = own_cosmos.server
    container = own_cosmos.provision([])
    fleet = seed_fleet(container, due=60, not_due=5)
    manager.container = container
    env = fault_env | {
        "COSMOS_ENDPOINT": server.endpoint,
        "COSMOS_CONNECTIONS_CONTAINER": own_cosmos.connections_name,
        "COSMOS_STATE_CONTAINER": own_cosmos.state_name,
        "TOKEN_REFRESH_PAGE_SIZE": "1",  # 60 pages: the scan is long enough to be cut
    }

    host = hosts(env, "--once")
    assert tap.wait_for(lambda events: len(of_type(events, REFRESH_REQUESTED)) >= 3, timeout=20), host.output()
    server.stop()  # mid-scan: 3 of 60 pages published
    requested_before_outage = len(of_type(tap.events, REFRESH_REQUESTED))
    # Down until the check sees it (after the Cosmos SDK's own retries, 2-3 s): it waits, it does not fail (a
    # failed check is redelivered within seconds, and a short outage used up its deliveries).
    assert wait_until(lambda: "Cosmos DB failed during the check" in host.output(), timeout=20)
    # The outage ends with the data there, as with real Cosmos. This server keeps data in memory only,
    # so it comes back empty: hold the app still while the same documents are provisioned again.
    host.process.send_signal(signal.SIGSTOP)
    try:
        server.start()
        own_cosmos.provision(fleet.documents)
    finally:
        host.process.send_signal(signal.SIGCONT)
    host.process.wait(45)
    output = host.output()  # stdout and stderr together
    first = Cycle.parse(host.process.returncode, output, output)
    assert first.returncode == 0, first.explain()
    assert requested_before_outage < 60, "the scan finished before the outage: nothing was cut"
    assert "Cosmos DB failed during the check" in first.stderr, first.explain()  # cut mid-scan
    assert "Function manager_check_handler failed" not in first.stderr, first.explain()
    # The check ran again from the start once Cosmos was back: the first pages were requested twice
    # (same ids), refreshed once.
    assert first.counts() == (60, 60, 0, 0), first.explain()
    events = tap.everything()
    assert_no_event_lost(events, first)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(container, fleet, events, manager.calls)

    second = run_once(env)  # nothing left over
    assert second.counts() == (0, 0, 0, 0), second.explain()


# 7. The local host SIGKILLed mid-cycle and restarted -----------------------------------------------


@dataclass
class KillPoint:
    in_flight: threading.Event
    release: threading.Event
    victim: str | None = None


def kill_during_call(at_call: int, *, refreshed_by_the_manager: bool) -> tuple[Callable[[Call], Answer], KillPoint]:
    """A script whose call `at_call` stays in flight until released. Then the manager either gives
    up (503, nothing refreshed) or completes the refresh, though nobody is there for the answer."""
    state = KillPoint(threading.Event(), threading.Event())

    def script(number: int, call: Call) -> Answer:
        if number == at_call:
            state.victim = call.connection_id
            state.in_flight.set()
            state.release.wait(20)
            return Answer(200) if refreshed_by_the_manager else Answer(503)
        return Answer(200)

    return numbered(script), state


@pytest.mark.parametrize(
    ("refreshed_by_the_manager", "lease_ms"),
    [(False, 8500), (True, 8500), (True, 600_000)],  # 8500: the shortest lease the settings allow here
    ids=["manager-gave-up", "manager-refreshed", "manager-refreshed-lease-longer-than-a-delivery-waits"],
)
def test_host_killed_mid_cycle_and_restarted_catches_up(
    fault_env, cosmos_container, manager, tap, hosts, refreshed_by_the_manager, lease_ms
):
    fleet = seed_fleet(cosmos_container, due=10)
    manager.script, kill_point = kill_during_call(4, refreshed_by_the_manager=refreshed_by_the_manager)
    env = fault_env | {
        "TOKEN_REFRESH_INTERVAL_MS": "1000",
        "TOKEN_REFRESH_CLAIM_LEASE_MS": str(lease_ms),
        # A calls window of 5 s budget + 0.5 s + 1 s + 2 s in-flight = 8.5 s.
        "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "500",
        "INTEGRATION_MANAGER_TIMEOUT_MS": "1000",
    }

    first = hosts(env)
    assert kill_point.in_flight.wait(30), log_lines(first.output())
    first.process.send_signal(signal.SIGKILL)  # mid-call: a claim held, a message unacknowledged
    first.process.wait(10)
    kill_point.release.set()

    second = hosts(env)
    everything_reported = wait_until(lambda: set(fleet.due) <= connection_ids(tap.everything(), REFRESHED), timeout=30)
    assert second.interrupt() == 0, log_lines(second.output())
    assert everything_reported, (
        f"no refreshed event for {sorted(set(fleet.due) - connection_ids(tap.events, REFRESHED))}"
    )
    assert kill_point.victim in fleet.due
    assert_no_event_lost(tap.events)
    assert_nothing_refreshed_twice(manager.calls)
    assert_all_refreshed(cosmos_container, fleet, tap.events, manager.calls)
