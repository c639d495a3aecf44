"""`make soak`: the pipeline runs continuously (`python -m localdev run`, not `--once`) for many check cycles in
compressed time, over a fleet of several hundred connections, while the platform churns connections and a seeded
schedule injects every fault class; then it measures what docs/scale.md#the-soak lists (and says how each is counted):

- tokens_expired_while_refreshable (goal 0), calls_per_token_lifetime (goal 1.00),
- requests_without_outcome (goal 0),
- pacing_max_10s_over_limit (goal <= 1.10), pacing_max_1s_excess_calls (goal <= 1),
- alarms_raised against alarms_expected (an alarm during every systemic fault).

It starts its own RabbitMQ node and Cosmos-compatible server on free loopback ports, the stand-in
integration-manager in this process (it refreshes by writing the document and records every call), and one or two
local hosts as processes. Prints the seed and the whole schedule first (`--seed N` replays it), the figures at the
end, writes bench/soak-results.json, and exits 1 when a goal is missed (naming it), 2 when a service does not start.

    python bench/soak.py [--duration 600] [--connections 300] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(APP_ROOT))

from urllib3.exceptions import InsecureRequestWarning

from bench.soak_figures import (
    GOALS,
    RefreshWrite,
    RequestSeen,
    Window,
    alarms_matched,
    calls_per_token_lifetime,
    expired_while_refreshable,
    missed_goals,
    pacing_figures,
    requests_without_outcome,
)
from bench.soak_plan import Fault, Plan, make_plan, rate_limits, rate_limits_setting
from bench.soak_world import FaultBoard, Ledger, LedgerContainer, Platform, SoakManager, manager_script

warnings.filterwarnings("ignore", category=InsecureRequestWarning)  # local emulator only

RESULTS_JSON = APP_ROOT / "bench" / "soak-results.json"
LOG_ROOT = APP_ROOT / ".local" / "soak"

# Compressed time (docs/scale.md#the-soak): a check every 5 s, tokens of 2-3 minutes, refreshed 90 s before they
# expire. The threshold is twice the longest fault (a 60-s Cosmos blip): the margin production has (1 h against a
# minute's outage), so that a token expires only if the app fails it, not because faults outlast the threshold.
INTERVAL_MS = 5_000
THRESHOLD_MS = 90_000
MANAGER_TOKEN_LIFETIME = timedelta(seconds=150)  # what a refresh issues
READ_TIMEOUT_MS = 2_000
# A token is excused only when integration-manager failed it for all of its due time but stretches shorter than this:
# a check interval and the call (docs/scale.md#the-soak).
NEED_S = INTERVAL_MS / 1000 + 3
SETTLE_S = 15.0  # requests first seen this close to the end may still be on their way: pending, not counted
HOST_WORKERS = 8

APP_SETTINGS = {
    "TOKEN_REFRESH_ENABLED": "true",
    "TOKEN_REFRESH_INTERVAL_MS": str(INTERVAL_MS),
    "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": str(THRESHOLD_MS),
    "TOKEN_REFRESH_RATE_LIMITS": rate_limits_setting(),
    "TOKEN_REFRESH_CHECK_TIME_BUDGET_MS": "20000",
    "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "1000",
    "INTEGRATION_MANAGER_TIMEOUT_MS": str(READ_TIMEOUT_MS),
    "INTEGRATION_MANAGER_MAX_ATTEMPTS": "3",
    "INTEGRATION_MANAGER_BACKOFF_INITIAL_MS": "200",
    "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "5000",
    "INTEGRATION_MANAGER_IN_FLIGHT_MS": "3000",
    "TOKEN_REFRESH_MAX_DELIVERY_COUNT": "10",
    "TOKEN_REFRESH_RETRY_DELAY_MS": "1000",
    "TOKEN_REFRESH_CLAIM_LEASE_MS": "60000",
    "TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS": "60000",
    "INTEGRATION_MANAGER_TOKEN": "soak-manager-token",
    "COSMOS_DATABASE": "integrations",
    "COSMOS_EMULATOR": "true",
}

OUTCOME_TYPES = ("integration.token.refreshed", "integration.token.refresh.failed")
REQUESTED = "integration.token.refresh-requested"
SYSTEMIC = "integration.token.refresh.systemic-failure"


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


class ServiceFailed(Exception):
    """A local service did not start: one line, no traceback."""


# Hosts ---------------------------------------------------------------------------------------------------------


class HostProcess:
    """`python -m localdev run` (continuous) in the background, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path, prefix: str):
        from tests.support.helpers import CLI

        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*CLI, "run", "--queue-prefix", prefix, "--workers", str(HOST_WORKERS)],
                cwd=APP_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL, as a crashed instance."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (the host stops consuming and closes), SIGKILL if it does not."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class Hosts:
    """The main host (killed and restarted by `host_kill`) and a second one while `two_hosts` lasts."""

    def __init__(self, env: dict[str, str], log_dir: Path, prefix: str):
        self.env, self.log_dir, self.prefix = env, log_dir, prefix
        self.started: list[HostProcess] = []
        self.main: HostProcess | None = None
        self.second: HostProcess | None = None
        self._lock = threading.Lock()

    def _start(self, name: str) -> HostProcess:
        host = HostProcess(self.env, self.log_dir / f"host-{len(self.started) + 1:02d}-{name}.log", self.prefix)
        self.started.append(host)
        return host

    def start_main(self) -> None:
        with self._lock:
            self.main = self._start("main")

    def kill_main(self) -> None:
        with self._lock:
            if self.main is not None:
                self.main.kill()
                self.main = None

    def start_second(self) -> None:
        with self._lock:
            self.second = self._start("second")

    def stop_second(self) -> None:
        with self._lock:
            second, self.second = self.second, None
        if second is not None:
            second.stop()

    def stop_all(self) -> None:
        for host in self.started:
            host.stop()

    def running(self) -> int:
        return sum(1 for host in self.started if host.process.poll() is None)


# The event tap -------------------------------------------------------------------------------------------------


class Tap(threading.Thread):
    """Every event on the exchange (a durable queue bound to `#`: it outlives a broker restart), with the time it
    was seen."""

    def __init__(self, url: str, exchange: str):
        super().__init__(name="soak-tap", daemon=True)
        from tests.support.event_taps import DurableTap

        self.tap = DurableTap(url, exchange)
        self.events: list[tuple[float, str, dict]] = []
        self.errors = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.drain_once()
            self._stop_event.wait(0.2)

    def drain_once(self) -> None:
        try:
            drained = self.tap.drain(timeout=5)
        except Exception:  # noqa: BLE001 - the broker restarts; the next round reconnects
            self.errors += 1
            self.tap._connection = None
            time.sleep(0.5)
            return
        now = time.time()
        with self._lock:
            self.events.extend((now, event.routing_key, event.body) for event in drained)
        self.tap.events.clear()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        for _ in range(3):
            self.drain_once()

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for _, key, _ in self.events if key == kind)


# Faults --------------------------------------------------------------------------------------------------------


class FaultRunner:
    """Applies the plan's faults at their times, each in a thread of its own."""

    def __init__(self, plan: Plan, t0: float, board: FaultBoard, *, manager: SoakManager, services: dict, hosts: Hosts):
        self.plan, self.t0, self.board, self.manager = plan, t0, board, manager
        self.services, self.hosts = services, hosts
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self._stop = threading.Event()

    def start(self) -> None:
        for fault in self.plan.faults:
            thread = threading.Thread(target=self._run, args=(fault,), name=f"fault-{fault.kind}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def _wait_until(self, moment: float) -> bool:
        return not self._stop.wait(max(0.0, moment - time.time()))

    def _run(self, fault: Fault) -> None:
        if not self._wait_until(self.t0 + fault.at):
            return
        try:
            self._apply(fault)
        except Exception as error:  # noqa: BLE001 - reported with the figures
            self.errors.append(f"{fault.kind} at t={fault.at}: {error.__class__.__name__}: {error}")

    def _apply(self, fault: Fault) -> None:
        kind = fault.kind
        if kind.startswith("manager_"):
            with self.board.running(fault):
                if kind == "manager_down":
                    self.manager.refuse_connections()
                try:
                    self._stop.wait(fault.duration)
                finally:
                    if kind == "manager_down":
                        self.manager.accept_connections()
        elif kind.startswith("cosmos_blip"):
            faults = self.services["cosmos_faults"]
            with self.board.running(fault, manager_fault=False):
                faults.inject_fault(status=fault.params["status"], times=-1)
                try:
                    self._stop.wait(fault.duration)
                finally:
                    faults.clear_faults()
        elif kind == "rabbitmq_restart":
            with self.board.running(fault, manager_fault=False):
                self.services["rabbitmq"].restart()
        elif kind == "host_kill":
            with self.board.running(fault, manager_fault=False):
                self.hosts.kill_main()
                self._stop.wait(fault.duration)
                self.hosts.start_main()
        elif kind == "two_hosts":
            with self.board.running(fault, manager_fault=False):
                self.hosts.start_second()
                try:
                    self._stop.wait(fault.duration)
                finally:
                    self.hosts.stop_second()
        else:
            raise ValueError(kind)


def run_churn(plan: Plan, t0: float, platform: Platform, stop: threading.Event, errors: list[str]) -> None:
    for action in plan.actions:
        if stop.wait(max(0.0, t0 + action.at - time.time())):
            return
        try:
            platform.apply(action.kind, action.connection, action.answer)
        except Exception as error:  # noqa: BLE001 - reported with the figures
            errors.append(f"{action.kind} {action.connection.connection_id} at t={action.at}: {error!r}"[:300])


# Services ------------------------------------------------------------------------------------------------------


def start_services(base: Path) -> dict[str, Any]:
    """RabbitMQ and the Cosmos-compatible server on free loopback ports, started at once. Raises ServiceFailed with
    one line naming the service and its log."""
    from localdev.local_services import CosmosServer, RabbitMQ
    from tests.support.cosmos_faults import CosmosFaults

    services: dict[str, Any] = {"rabbitmq": RabbitMQ(base / "rabbitmq"), "cosmos": CosmosServer(base / "cosmos")}
    failures: dict[str, BaseException] = {}

    def start(name: str) -> None:
        try:
            services[name].start()
        except BaseException as error:  # noqa: BLE001 - reported in one line below
            failures[name] = error

    threads = [threading.Thread(target=start, args=(name,)) for name in ("rabbitmq", "cosmos")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        stop_services(services)
        name, error = next(iter(failures.items()))
        first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        where = {"rabbitmq": base / "rabbitmq", "cosmos": base / "cosmos"}[name]
        raise ServiceFailed(
            f"{'RabbitMQ' if name == 'rabbitmq' else 'the Cosmos server'} did not start: {first} (logs under {where})"
        )
    services["cosmos_faults"] = CosmosFaults(services["cosmos"])
    return services


def stop_services(services: dict[str, Any]) -> None:
    for name in ("rabbitmq", "cosmos"):
        with contextlib.suppress(Exception):
            services[name].stop()


def dead_letters(url: str, prefix: str) -> dict[str, int]:
    """Messages in the local host's dead-letter queues at the end."""
    import pika

    counts = {}
    with contextlib.suppress(Exception), contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as conn:
        for queue in ("check-expiring", "refresh-requested"):
            name = f"{prefix}{queue}.dead-letter"
            with contextlib.suppress(Exception):
                channel = conn.channel()
                counts[name] = channel.queue_declare(name, passive=True).method.message_count
    return counts


# The run -------------------------------------------------------------------------------------------------------


def epoch(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=600, help="seconds of the run, drain included (600: every fault class)"
    )
    parser.add_argument("--connections", type=int, default=300, help="connections seeded at the start (300)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's plan (default: a random seed)")
    parser.add_argument("--results", type=Path, default=RESULTS_JSON, help="where to write the figures")
    args = parser.parse_args(argv)
    if args.duration < 60:
        parser.error("--duration must be at least 60 s (a warm-up, some faults and a drain of 45 s)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    plan = make_plan(seed, args.connections, args.duration)
    say(
        f"seed {seed} (replay: python bench/soak.py --seed {seed} --duration {args.duration:g} "
        f"--connections {args.connections})"
    )
    for line in plan.describe():
        print(f"  {line}", flush=True)

    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{seed}"
    log_dir = LOG_ROOT / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"logs: {log_dir}")
    try:
        services = start_services(log_dir / "services")
    except ServiceFailed as error:
        print(f"soak: error: {error}", file=sys.stderr)
        return 2
    try:
        return run(plan, services, log_dir, args.results)
    finally:
        stop_services(services)


def run(plan: Plan, services: dict[str, Any], log_dir: Path, results_path: Path) -> int:
    from azure.cosmos import CosmosClient, PartitionKey

    from shared.errors import SettingsError
    from shared.ids import outcome_event_id
    from shared.settings import load_settings, setting_fields
    from tests.support.helpers import cli_environment

    rabbitmq, cosmos = services["rabbitmq"], services["cosmos"]
    suffix = uuid.uuid4().hex[:8]
    client = CosmosClient(cosmos.endpoint, credential=cosmos.key)
    database = client.create_database_if_not_exists("integrations")
    container = database.create_container(f"connections_{suffix}", partition_key=PartitionKey(path="/tenantId"))

    ledger = Ledger()
    board = FaultBoard()
    platform = Platform(container, ledger, say)
    ledger_container = LedgerContainer(container, ledger)
    manager = SoakManager(
        manager_script(ledger, board, READ_TIMEOUT_MS / 1000, plan.seed), ledger_container, MANAGER_TOKEN_LIFETIME
    )
    ledger_container.manager = manager
    manager.start()

    exchange, prefix = f"soak.events.{suffix}", f"soak-{suffix}."
    values = {name: "" for name in setting_fields()}  # blank = the default: nothing leaks in from local.settings.json
    values |= APP_SETTINGS | {
        "COSMOS_ENDPOINT": cosmos.endpoint,
        "COSMOS_KEY": cosmos.key,
        "COSMOS_CONNECTIONS_CONTAINER": container.id,
        "COSMOS_STATE_CONTAINER": f"state_{suffix}",
        "RABBITMQ_URL": rabbitmq.url,
        "RABBITMQ_EXCHANGE": exchange,
        "INTEGRATION_MANAGER_URL": manager.url,
    }
    try:
        load_settings({k: v for k, v in values.items() if v})
    except SettingsError as error:
        print(f"soak: error: the soak's settings are refused: {error}", file=sys.stderr)
        return 2
    env = cli_environment(values | {"LOCALDEV_STATE_DIR": tempfile.mkdtemp(prefix="soak-state-", dir=log_dir)})
    (log_dir / "settings.json").write_text(json.dumps({k: v for k, v in values.items() if "KEY" not in k}, indent=1))

    tap = Tap(rabbitmq.url, exchange)
    tap.start()
    seeded_at = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda connection: platform.seed(connection, seeded_at), plan.fleet))
    say(f"seeded {len(plan.fleet)} connections in {time.time() - seeded_at:.1f} s; starting the local host")

    hosts = Hosts(env, log_dir, prefix)
    t0 = time.time()
    monotonic_offset = time.time() - time.monotonic()
    hosts.start_main()
    faults = FaultRunner(plan, t0, board, manager=manager, services=services, hosts=hosts)
    faults.start()
    stop = threading.Event()
    churn_errors: list[str] = []
    churn = threading.Thread(target=run_churn, args=(plan, t0, platform, stop, churn_errors), daemon=True)
    churn.start()

    end = t0 + plan.duration_s
    try:
        while time.time() < end:
            time.sleep(min(15.0, max(0.0, end - time.time())))
            elapsed = time.time() - t0
            phase = "drain" if elapsed >= plan.active_end else "faults"
            refreshed = sum(1 for r in ledger.refreshes)
            say(
                f"t={elapsed:5.0f}s [{phase}] hosts {hosts.running()}, calls {len(manager.calls)}, refreshes "
                f"{refreshed}, requested {tap.count(REQUESTED)}, outcomes "
                f"{sum(tap.count(kind) for kind in OUTCOMES_KEYS)}, alarms {tap.count(SYSTEMIC)}; "
                f"running: {', '.join(board.active_kinds()) or '-'}"
            )
    except KeyboardInterrupt:
        say("interrupted: stopping, figures of what ran so far")
    finally:
        ended = time.time()
        stop.set()
        faults.stop()
        faults.join(60)
        hosts.stop_all()
        tap.stop()
        manager.stop()
        letters = dead_letters(rabbitmq.url, prefix)

    figures, details = compute(plan, ledger, board, manager, tap, t0, ended, monotonic_offset, outcome_event_id)
    details |= {
        "dead_letters": letters,
        "fault_runner_errors": faults.errors,
        "churn_errors": churn_errors,
        "tap_reconnects": tap.errors,
        "host_logs": summarize_logs(hosts, log_dir),
        "logs": str(log_dir),
    }
    alarms_ok = all(matched for _, matched in details.pop("_alarm_matches"))
    missed = missed_goals(figures, alarms_ok)
    report(plan, figures, details, missed)
    results = {
        **figures,
        "goals": GOALS,
        "goals_missed": missed,
        "seed": plan.seed,
        "settings": {k: v for k, v in APP_SETTINGS.items() if "TOKEN" not in k or "REFRESH" in k},
        "manager_token_lifetime_s": MANAGER_TOKEN_LIFETIME.total_seconds(),
        "plan": plan.to_json(),
        "details": details,
    }
    results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    say(f"wrote {results_path.relative_to(APP_ROOT) if results_path.is_relative_to(APP_ROOT) else results_path}")
    return 1 if missed else 0


OUTCOMES_KEYS = OUTCOME_TYPES


def compute(  # noqa: PLR0917 - what the run recorded, each once
    plan: Plan,
    ledger: Ledger,
    board: FaultBoard,
    manager: SoakManager,
    tap: Tap,
    t0: float,
    ended: float,
    monotonic_offset: float,
    outcome_event_id: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures (soak-results.json's keys) and the detail behind them."""
    rel = lambda moment: round(moment - t0, 1)  # noqa: E731 - seconds since the start, for the detail

    # Windows in which integration-manager failed every call (or one integration's): as applied, no grace.
    windows, systemic = [], []
    applied = []
    for fault, started, ended_at in board.windows:
        stopped = ended_at or ended
        applied.append({"kind": fault.kind, "from": rel(started), "to": rel(stopped), "params": fault.params})
        # A RabbitMQ restart stops the app itself (the broker that triggers its functions, as Service Bus does in
        # Azure): nothing can refresh meanwhile, as when the manager refuses.
        if fault.kind.startswith(("manager_", "cosmos_blip")) or fault.kind == "rabbitmq_restart":
            windows.append(Window(started, stopped, fault.kind, fault.params.get("integration")))
            if fault.systemic:  # the alarm may come with the failures of the last calls of the window
                systemic.append(Window(started, stopped + NEED_S, fault.kind))

    # 1. Tokens that expired while refreshable.
    verdicts = expired_while_refreshable(
        ledger.versions,
        ledger.not_refreshable(),
        windows,
        until=ended,
        threshold_s=THRESHOLD_MS / 1000,
        need_s=NEED_S,
        limits=rate_limits(),
    )

    # Requests and outcomes seen on the exchange.
    requests: dict[str, RequestSeen] = {}
    request_versions: dict[str, tuple[str, int]] = {}
    outcome_ids, alarms = set(), {}
    outcome_by_connection: dict[str, list[tuple[float, str, dict]]] = defaultdict(list)
    for seen, kind, body in tap.events:
        data = body.get("data", {})
        if kind == REQUESTED:
            request = requests.get(body["id"])
            if request is None:
                request = requests[body["id"]] = RequestSeen(body["id"], data.get("connectionId"), seen)
                expires = epoch(data.get("expiresAt"))
                if expires is not None:
                    request_versions[body["id"]] = (data.get("connectionId"), round(expires * 1000))
            request.max_round = max(request.max_round, int(data.get("attemptRound") or 0))
            if request.first_seen == seen and request.not_before is None:
                request.not_before = epoch(data.get("notBefore"))  # its first copy's: later checks re-publish it
        elif kind in OUTCOME_TYPES:
            outcome_ids.add(body["id"])
            outcome_by_connection[data.get("connectionId")].append((seen, kind.rsplit(".", 1)[-1], data))
        elif kind == SYSTEMIC:
            alarms.setdefault(body["id"], seen)

    # 2. Calls per token lifetime.
    writes = []
    for record in ledger.refreshes:
        request_id = (record.idempotency_key or "").split(".")[0]
        version = request_versions.get(request_id) or (record.connection_id, record.replaced_expiry_ms or 0)
        writes.append(RefreshWrite(version, record.idempotency_key))
    per_lifetime = calls_per_token_lifetime(writes)

    # 3. Requests without an outcome.
    request_verdicts = requests_without_outcome(
        requests.values(),
        outcome_ids,
        outcome_id=outcome_event_id,
        outcome_types=OUTCOME_TYPES,
        churn=ledger.churn,
        cutoff=ended - SETTLE_S,
    )

    # 4. Pacing.
    calls = [(call.integration_id, call.received_at + monotonic_offset) for call in manager.calls]
    pacing = pacing_figures(calls, rate_limits())

    # 5. Alarms.
    matches = alarms_matched(systemic, alarms.values())

    figures = {
        "tokens_expired_while_refreshable": len(verdicts.expired),
        "calls_per_token_lifetime": round(per_lifetime.figure, 4),
        "requests_without_outcome": len(request_verdicts.without_outcome),
        "pacing_max_10s_over_limit": round(max((p.ratio_10s for p in pacing), default=0.0), 3),
        "pacing_max_1s_excess_calls": max((p.excess_1s for p in pacing), default=0.0),
        "alarms_raised": len(alarms),
        "alarms_expected": len(systemic),
    }
    calls_by_connection: dict[str, list[Any]] = defaultdict(list)
    for call in manager.calls:
        calls_by_connection[call.connection_id].append(call)

    def token_story(version: Any) -> dict[str, Any]:
        near = [
            c
            for c in calls_by_connection[version.connection_id]
            if version.written_at - 1 <= c.received_at + monotonic_offset <= version.expires_at + 60
        ]
        return {
            "connection": version.connection_id,
            "integration": version.integration_id,
            "expiresAt": version.value,
            "expires_t": rel(version.expires_at),
            "written_t": rel(version.written_at),
            "written_by": version.written_by,
            "replaced_t": rel(version.ended_at) if version.ended_at else None,
            "replaced_by": version.ended_by,
            "requests_t": sorted(
                rel(r.first_seen)
                for r in requests.values()
                if r.connection_id == version.connection_id
                and version.written_at - 1 <= r.first_seen <= version.expires_at + 60
            ),
            "calls": [(rel(c.received_at + monotonic_offset), c.status) for c in near],
            "outcomes": [
                (rel(t), kind, (data.get("error") or {}).get("code"))
                for t, kind, data in outcome_by_connection[version.connection_id]
                if version.written_at - 1 <= t <= version.expires_at + 60
            ],
        }

    details = {
        "applied_faults": applied,
        "tokens": {
            "versions": len(ledger.versions),
            "expired_in_observation": len(verdicts.expired) + len(verdicts.excused) + verdicts.refreshed_in_time,
            "refreshed_in_time": verdicts.refreshed_in_time,
            "excused": Counter(reason for _, reason in verdicts.excused),
            "expired": [token_story(v) for v in verdicts.expired[:60]],
            "expired_by_form": Counter(
                v.value.__class__.__name__ + ":" + form_of(ledger, v.connection_id) for v in verdicts.expired
            ),
            "expired_by_integration": Counter(v.integration_id for v in verdicts.expired),
            "expired_by_written_by": Counter(v.written_by for v in verdicts.expired),
        },
        "calls_per_token_lifetime": {
            "token_versions_refreshed": per_lifetime.versions,
            "distinct_refreshing_keys": per_lifetime.keys,
            "refreshing_writes": per_lifetime.writes,
            "writes_per_version_repeated_keys_counted": round(per_lifetime.raw, 4),
            "refreshed_more_than_once": per_lifetime.refreshed_more_than_once[:30],
            "calls_total": len(manager.calls),
            "calls_by_status": Counter(str(call.status) for call in manager.calls),
        },
        "requests": {
            "distinct": len(requests),
            "with_outcome": request_verdicts.with_outcome,
            "documented_reason": Counter(reason for _, reason in request_verdicts.documented),
            "pending_at_end": len(request_verdicts.pending_at_end),
            "without_outcome": [
                {
                    "request": r.request_id,
                    "connection": r.connection_id,
                    "first_seen_t": rel(r.first_seen),
                    "not_before_t": rel(r.not_before) if r.not_before else None,
                    "round": r.max_round,
                }
                for r in request_verdicts.without_outcome[:60]
            ],
        },
        "pacing": [
            {
                "integration": p.integration_id,
                "limit_per_s": p.limit_per_s,
                "calls": p.calls,
                "max_1s": p.max_1s,
                "max_10s": p.max_10s,
                "ratio_10s": round(p.ratio_10s, 3),
                "excess_1s": p.excess_1s,
            }
            for p in pacing
        ],
        "alarms": {
            "seen_t": sorted(rel(t) for t in alarms.values()),
            "systemic_faults": [{"from": rel(w.start), "to_with_grace": rel(w.end), "alarm": ok} for w, ok in matches],
        },
        "_alarm_matches": matches,
    }
    return figures, details


def form_of(ledger: Ledger, connection_id: str) -> str:
    state = ledger.state(connection_id)
    return state.form if state else "?"


LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


def summarize_logs(hosts: Hosts, log_dir: Path) -> dict[str, Any]:
    """What the hosts logged: lines per level, the commonest warnings and errors (ids stripped), skip reasons."""
    levels: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    skips: Counter[str] = Counter()
    for host in hosts.started:
        with contextlib.suppress(OSError), host.log.open(errors="replace") as lines:
            for line in lines:
                match = LOG_LINE.match(line.rstrip())
                if not match:
                    continue
                level, message = match["level"], match["message"]
                levels[level] += 1
                generic = re.sub(r"\(connectionId=.*?\)", "(…)", message)
                generic = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", generic)
                generic = re.sub(r"\d+(\.\d+)?", "N", generic)[:160]
                if message.startswith("Not refreshing"):
                    skips[generic.split(": ", 1)[-1][:100]] += 1
                elif level in ("WARNING", "ERROR", "CRITICAL"):
                    notable[f"{level} {generic}"] += 1
    return {"levels": levels, "skip_reasons": skips, "warnings_and_errors": dict(notable.most_common(25))}


def report(plan: Plan, figures: dict[str, Any], details: dict[str, Any], missed: list[str]) -> None:
    print(flush=True)
    say(f"figures (seed {plan.seed}):")
    tokens = details["tokens"]
    repeats = details["calls_per_token_lifetime"]["writes_per_version_repeated_keys_counted"]
    rows = [
        (
            "tokens_expired_while_refreshable",
            figures["tokens_expired_while_refreshable"],
            "0",
            f"of {tokens['expired_in_observation']} token versions whose expiry passed ({tokens['refreshed_in_time']} "
            f"refreshed in time; not counted, manager scripted to refuse them: {sum(tokens['excused'].values())})",
        ),
        (
            "calls_per_token_lifetime",
            f"{figures['calls_per_token_lifetime']:.2f}",
            "1.00",
            "distinct Idempotency-Keys whose call refreshed a token version, per refreshed version (retries of one key "
            f"count once; repeats counted each time: {repeats:.2f})",
        ),
        (
            "requests_without_outcome",
            figures["requests_without_outcome"],
            "0",
            f"of {details['requests']['distinct']} request ids ({details['requests']['with_outcome']} with an outcome, "
            f"{sum(details['requests']['documented_reason'].values())} revoked/deleted/reconnected, "
            f"{details['requests']['pending_at_end']} pending at the end)",
        ),
        (
            "pacing_max_10s_over_limit",
            f"{figures['pacing_max_10s_over_limit']:.2f}",
            "<= 1.10",
            "; ".join(f"{p['integration']} {p['max_10s']}/10s at {p['limit_per_s']:g}/s" for p in details["pacing"]),
        ),
        (
            "pacing_max_1s_excess_calls",
            f"{figures['pacing_max_1s_excess_calls']:g}",
            "<= 1",
            "; ".join(f"{p['integration']} {p['max_1s']}/1s" for p in details["pacing"]),
        ),
        ("alarms_raised", figures["alarms_raised"], ">= expected", f"seen at t={details['alarms']['seen_t']}"),
        (
            "alarms_expected",
            figures["alarms_expected"],
            "-",
            "systemic faults injected (all connections answered 404 connection_not_found)",
        ),
    ]
    for name, value, goal, note in rows:
        print(f"  {name:<34} {value!s:>8}   goal {goal:<12} {note}", flush=True)
    if details["dead_letters"]:
        print(f"  dead letters at the end: {details['dead_letters']}")
    for label in ("fault_runner_errors", "churn_errors"):
        if details[label]:
            print(f"  {label}: {details[label][:5]}")
    if missed:
        say("goals missed: " + "; ".join(missed))
    else:
        say("every goal met")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("azure", "pika", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
