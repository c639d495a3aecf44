"""`make bench`: performance figures, each a ratio or count against a baseline measured in the same run.

Writes bench/results.json and bench/RESULTS.md and prints both. Runs against real local services
(RabbitMQ, the Cosmos-compatible server) started here on free loopback ports.

Figures (issue "Scale"):
- check_ratio_vs_raw: connections/s of the check stage (query + publish refresh-requested) at
  20,000 expiring connections / a bare azure-cosmos paged query + bare pika windowed-confirm publish.
- check_rss_growth_mib: peak RSS growth of the check stage at 50,000 minus at 2,000 connections.
- refresh_ratio_vs_raw: refreshes/s through the local host (2,000 messages, stand-in manager with
  20 ms latency) / a raw requests.Session loop at the same concurrency.
- connections_per_service: connections opened to RabbitMQ, the manager and Cosmos over 500 invocations.
- import_ms: cold import time of each function module in a fresh interpreter, and `import azure.functions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(APP_ROOT))

import pika
from azure.cosmos import CosmosClient, PartitionKey
from urllib3.exceptions import InsecureRequestWarning

from localdev.local_services import CosmosServer, RabbitMQ
from shared.connection_store import EXPIRING_CONNECTIONS_QUERY, ConnectionStore
from shared.events import CheckExpiringData, make_event
from shared.expiring_check import request_refresh_for_expiring_connections
from shared.messaging import EventPublisher, RabbitMqTransport
from shared.settings import load_settings
from shared.state_store import StateStore
from shared.times import format_time, utc_now

warnings.filterwarnings("ignore", category=InsecureRequestWarning)  # local emulator only

RESULTS_JSON = APP_ROOT / "bench" / "results.json"
REPORT = APP_ROOT / "bench" / "RESULTS.md"
CHECK_CONNECTIONS = 20_000
RSS_SMALL, RSS_LARGE = 2_000, 50_000
# The emulator re-runs the whole query for every page, so 50,000 rows in pages of 1,000 take it
# half an hour. Pages of 2,000 keep it to minutes, and both sizes then run full pages: a page's
# transient memory is the same, and any growth left is what the scan keeps.
RSS_PAGE_SIZE = 2_000
REFRESH_MESSAGES = 2_000
REFRESH_LATENCY_S = 0.020
REFRESH_WORKERS = 16
INVOCATIONS = 500
PAGE_SIZE = 1000  # the emulator re-runs a query per page: bigger pages keep a 50,000-row scan in minutes
CONFIRM_WINDOW = 200
# One invocation scans everything here (no follow-up checks), so both sides do the same work.
BENCH_SETTINGS = {"TOKEN_REFRESH_PAGE_SIZE": str(PAGE_SIZE), "TOKEN_REFRESH_CHECK_TIME_BUDGET_MS": "3600000"}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def iso(moment: datetime) -> str:
    return format_time(moment)


# Setup ------------------------------------------------------------------------------------------


def seed(container: Any, count: int, prefix: str = "c") -> None:
    """Upsert `count` connections expiring within the next half hour (8 requests in flight)."""
    now = utc_now()

    def one(n: int) -> None:
        container.upsert_item(
            {
                "id": f"{prefix}-{n:06d}",
                "tenantId": f"tenant-{n % 50}",
                "integrationId": ("salesforce", "google", "hubspot", "slack")[n % 4],
                "status": "active",
                "oauth": {
                    "accessToken": "a" * 40,
                    "refreshToken": "r" * 40,
                    "expiresAt": iso(now + timedelta(seconds=n % 1800)),
                },
            }
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def new_container(database: Any, label: str) -> Any:
    return database.create_container(f"{label}_{uuid.uuid4().hex[:8]}", partition_key=PartitionKey("/tenantId"))


def bound_queue(url: str, exchange: str) -> tuple[Any, str]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    queue = channel.queue_declare(f"bench.{uuid.uuid4().hex[:6]}", durable=True).method.queue
    channel.queue_bind(queue, exchange, routing_key="#")
    return connection, queue


def app_settings(cosmos: CosmosServer, rabbitmq: RabbitMQ, container_id: str, manager_url: str, label: str) -> dict:
    """The app's settings against the bench's services, with a state container and exchange of its own."""
    return {
        "COSMOS_ENDPOINT": cosmos.endpoint,
        "COSMOS_KEY": cosmos.key,
        "COSMOS_EMULATOR": "true",
        "COSMOS_DATABASE": "bench",
        "COSMOS_CONNECTIONS_CONTAINER": container_id,
        "COSMOS_STATE_CONTAINER": f"state_{uuid.uuid4().hex[:6]}",
        "RABBITMQ_URL": rabbitmq.url,
        "RABBITMQ_EXCHANGE": f"bench.{label}.{uuid.uuid4().hex[:6]}",
        "INTEGRATION_MANAGER_URL": manager_url,
    }


def purge(url: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        connection.channel().queue_purge(queue)


# 1. Check stage vs raw ----------------------------------------------------------------------------


def raw_check(container: Any, url: str, exchange: str, threshold: datetime) -> int:
    """The baseline: bare paged query + bare pika publish with confirms in windows."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    unconfirmed: set[int] = set()

    def on_confirm(frame: Any) -> None:
        tag = frame.method.delivery_tag
        if frame.method.multiple:
            unconfirmed.difference_update({t for t in unconfirmed if t <= tag})
        else:
            unconfirmed.discard(tag)

    selected: list[Any] = []
    channel._impl.confirm_delivery(ack_nack_callback=on_confirm, callback=selected.append)
    connection._flush_output(lambda: bool(selected))
    impl, tag, published = channel._impl, 1, 0
    parameters = [
        {"name": "@thresholdTextBound", "value": iso(threshold + timedelta(hours=14))},
        {"name": "@thresholdEpochMs", "value": int(threshold.timestamp() * 1000)},
        {"name": "@skipStatuses", "value": ["revoked", "disabled", "deleted"]},
    ]
    pages = container.query_items(
        EXPIRING_CONNECTIONS_QUERY, parameters=parameters, enable_cross_partition_query=True, max_item_count=PAGE_SIZE
    ).by_page()
    for page in pages:
        for row in page:
            impl.basic_publish(
                exchange,
                "integration.token.refresh-requested",
                json.dumps(row).encode(),
                pika.BasicProperties(delivery_mode=2, message_id=row["id"]),
            )
            unconfirmed.add(tag)
            tag += 1
            published += 1
            if len(unconfirmed) >= CONFIRM_WINDOW:
                connection._flush_output(lambda: len(unconfirmed) < CONFIRM_WINDOW // 2)
    connection._flush_output(lambda: not unconfirmed)
    connection.close()
    return published


def app_check(container: Any, states: StateStore, url: str, exchange: str, threshold: datetime) -> int:
    settings = load_settings(BENCH_SETTINGS)
    publisher = EventPublisher([RabbitMqTransport(url, exchange, confirm_window=CONFIRM_WINDOW)])
    now = utc_now()
    check = CheckExpiringData(timestamp=now, threshold_time=threshold)
    summary = request_refresh_for_expiring_connections(
        check, store=ConnectionStore(container, PAGE_SIZE), states=states, publisher=publisher, settings=settings
    )
    publisher.close()
    return summary.published


def bench_check(database: Any, states: StateStore, rabbitmq: RabbitMQ) -> dict[str, Any]:
    container = new_container(database, "check")
    log(f"check: seeding {CHECK_CONNECTIONS:,} expiring connections")
    seed(container, CHECK_CONNECTIONS)
    exchange = f"bench.check.{uuid.uuid4().hex[:6]}"
    keeper, queue = bound_queue(rabbitmq.url, exchange)
    keeper.close()  # the durable queue stays bound; an idle connection would miss heartbeats
    threshold = utc_now() + timedelta(hours=1)
    rates: dict[str, list[float]] = {"app": [], "raw": []}
    for round_ in range(2):
        for name, run in (("raw", raw_check), ("app", None)):
            started = time.perf_counter()
            if run is None:
                count = app_check(container, states, rabbitmq.url, exchange, threshold)
            else:
                count = run(container, rabbitmq.url, exchange, threshold)
            seconds = time.perf_counter() - started
            assert count == CHECK_CONNECTIONS, (name, count)
            rates[name].append(count / seconds)
            purge(rabbitmq.url, queue)
            log(f"check round {round_ + 1}: {name} {count / seconds:,.0f} connections/s")
    app, raw = statistics.median(rates["app"]), statistics.median(rates["raw"])
    return {
        "check_ratio_vs_raw": round(app / raw, 3),
        "check_connections_per_s": round(app),
        "check_raw_connections_per_s": round(raw),
        "check_connections": CHECK_CONNECTIONS,
    }


# 2. RSS growth ------------------------------------------------------------------------------------

RSS_PROBE = """
import json, resource, sys, warnings
sys.path.insert(0, {root!r})
from datetime import timedelta
from azure.cosmos import CosmosClient
from urllib3.exceptions import InsecureRequestWarning
warnings.filterwarnings("ignore", category=InsecureRequestWarning)
from shared.connection_store import ConnectionStore
from shared.events import CheckExpiringData
from shared.times import utc_now
from shared.expiring_check import request_refresh_for_expiring_connections
from shared.messaging import EventPublisher, RabbitMqTransport
from shared.settings import load_settings
from shared.state_store import StateStore
database = CosmosClient({endpoint!r}, credential={key!r}).get_database_client("bench")
store = ConnectionStore(database.get_container_client({container!r}), {page_size})
states = StateStore(database.get_container_client({states!r}))
publisher = EventPublisher([RabbitMqTransport({url!r}, {exchange!r})])
settings = load_settings({settings!r})
now = utc_now()
warm = CheckExpiringData(timestamp=now, threshold_time=now - timedelta(days=3650))  # nothing due: warms clients
request_refresh_for_expiring_connections(warm, store=store, states=states, publisher=publisher, settings=settings)
def rss_kib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() // 1024
def peak_rss_kib():
    # VmHWM: this process's own peak. Not ru_maxrss: a child started by subprocess (vfork + exec)
    # inherits the parent's peak there, so after the bench process seeded 50,000 rows it reported that.
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM to the current RSS: the peak below is the check's alone
before = rss_kib()
check = CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1))
summary = request_refresh_for_expiring_connections(check, store=store, states=states, publisher=publisher,
                                                   settings=settings)
peak = peak_rss_kib()
print(json.dumps({{"published": summary.published, "before_kib": before, "peak_kib": peak}}))
"""


def bench_rss(database: Any, cosmos: CosmosServer, states_name: str, rabbitmq: RabbitMQ) -> dict[str, Any]:
    growth = {}
    for size in (RSS_SMALL, RSS_LARGE):
        container = new_container(database, f"rss{size}")
        log(f"rss: seeding {size:,} expiring connections")
        seed(container, size)
        exchange = f"bench.rss.{uuid.uuid4().hex[:6]}"
        code = RSS_PROBE.format(
            root=str(APP_ROOT),
            endpoint=cosmos.endpoint,
            key=cosmos.key,
            container=container.id,
            states=states_name,
            url=rabbitmq.url,
            exchange=exchange,
            settings=BENCH_SETTINGS,
            page_size=RSS_PAGE_SIZE,
        )
        result = json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        )
        assert result["published"] == size, result
        growth[size] = max(0, result["peak_kib"] - result["before_kib"]) / 1024
        log(f"rss: {size:,} connections -> peak RSS growth {growth[size]:.1f} MiB")
        database.delete_container(container.id)
    return {
        "check_rss_growth_mib": round(growth[RSS_LARGE] - growth[RSS_SMALL], 2),
        "check_rss_growth_small_mib": round(growth[RSS_SMALL], 2),
        "check_rss_growth_large_mib": round(growth[RSS_LARGE], 2),
    }


# 3. Refresh stage vs raw --------------------------------------------------------------------------


def slow_manager(latency_s: float) -> Any:
    from localdev.stand_in_manager import Answer, StandInManager

    return StandInManager(script=lambda call: Answer(200, {}, delay_s=latency_s)).start()


RAW_REFRESH_PROBE = """
import json, threading, time
import requests
url, workers, count = {url!r}, {workers}, {count}

def run(share):
    session = requests.Session()
    for n in share:
        session.post(f"{{url}}/api/v1/integrations/i/connections/c-{{n}}/refresh", json={{"tenantId": "t"}}, timeout=10)

threads = [threading.Thread(target=run, args=(range(k, count, workers),)) for k in range(workers)]
started, cpu = time.perf_counter(), time.process_time()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({{"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}}))
"""


def raw_refresh(url: str, workers: int, count: int) -> dict[str, float]:
    """Baseline: `workers` threads in a process of their own (like the local host), each a
    requests.Session, POSTing their share of `count` refreshes."""
    code = RAW_REFRESH_PROBE.format(url=url, workers=workers, count=count)
    timing = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    return {"per_s": count / timing["seconds"], "cpu_ms": timing["cpu_seconds"] * 1000 / count}


REFRESH_PROBE = """
import json, sys, time, warnings
sys.path.insert(0, {root!r})
import requests as requests_lib
from urllib3.exceptions import InsecureRequestWarning
warnings.filterwarnings("ignore", category=InsecureRequestWarning)
from shared import runtime
from shared.connection_store import ConnectionStore
from shared.expiring_check import refresh_requested_event
from shared.times import utc_now
from localdev.local_host import LocalHost
from shared.settings import load_settings
from datetime import timedelta
settings = load_settings()
host = LocalHost(settings, queue_prefix={prefix!r}, workers={workers})
host.connect()  # declares the queues
store = runtime.connection_store()
now = utc_now()
requests = [refresh_requested_event(c, now) for page in store.expiring_connection_pages(
    now + timedelta(hours=1), settings.skip_statuses) for c in page.connections]
runtime.publisher().publish(requests)
runtime.reset()  # the timed part starts with a cold process-wide client set, like a new worker
cosmos_requests = []
send = requests_lib.Session.send
def counting_send(session, request, **kwargs):  # counts the app's requests to Cosmos
    if request.url.startswith({cosmos_endpoint!r}):
        cosmos_requests.append(1)
    return send(session, request, **kwargs)
requests_lib.Session.send = counting_send
started, cpu = time.perf_counter(), time.process_time()
summary = host.run_once()  # TOKEN_REFRESH_ENABLED=false: no check, only the queued refresh requests
print(json.dumps({{"refreshed": summary.refreshed, "failed": summary.failed,
                  "refresh_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                  "cosmos_requests": len(cosmos_requests)}}))
"""


def app_refresh(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ, manager_url: str) -> dict[str, float]:
    """Refresh-requested messages through the local host (its worker threads run sync_refresh_handler)."""
    container = new_container(database, "refresh")
    seed(container, REFRESH_MESSAGES)
    env = app_settings(cosmos, rabbitmq, container.id, manager_url, "refresh") | {
        "TOKEN_REFRESH_ENABLED": "false",
        "TOKEN_REFRESH_PAGE_SIZE": str(PAGE_SIZE),
        "ServiceBusConnection": "",
        "ServiceBusConnection__fullyQualifiedNamespace": "",
    }
    code = REFRESH_PROBE.format(
        root=str(APP_ROOT),
        prefix=f"bench-{uuid.uuid4().hex[:6]}.",
        workers=REFRESH_WORKERS,
        cosmos_endpoint=cosmos.endpoint.rstrip("/"),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    timing = json.loads(result.stdout.strip().splitlines()[-1])
    assert timing["refreshed"] == REFRESH_MESSAGES, timing
    database.delete_container(container.id)
    return {
        "per_s": timing["refreshed"] / timing["refresh_seconds"],
        "cpu_ms": timing["cpu_seconds"] * 1000 / timing["refreshed"],
        "cosmos_requests_per_refresh": timing["cosmos_requests"] / timing["refreshed"],
    }


def bench_refresh(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ) -> dict[str, Any]:
    manager = slow_manager(REFRESH_LATENCY_S)
    try:
        log(f"refresh: raw requests.Session loop, {REFRESH_WORKERS} threads, {REFRESH_MESSAGES:,} calls")
        raw = raw_refresh(manager.url, REFRESH_WORKERS, REFRESH_MESSAGES)
        log(f"refresh: raw {raw['per_s']:,.0f}/s; local host with {REFRESH_WORKERS} workers")
        app = app_refresh(database, cosmos, rabbitmq, manager.url)
        log(
            f"refresh: local host {app['per_s']:,.0f}/s; CPU per refresh {app['cpu_ms']:.2f} ms (raw call "
            f"{raw['cpu_ms']:.2f} ms), {app['cosmos_requests_per_refresh']:.2f} Cosmos requests per refresh"
        )
    finally:
        manager.stop()
    return {
        "refresh_ratio_vs_raw": round(app["per_s"] / raw["per_s"], 3),
        "refresh_per_s": round(app["per_s"]),
        "refresh_raw_per_s": round(raw["per_s"]),
        "refresh_cpu_ms": round(app["cpu_ms"], 2),
        "refresh_raw_cpu_ms": round(raw["cpu_ms"], 2),
        "refresh_cosmos_requests": round(app["cosmos_requests_per_refresh"], 2),
        "refresh_workers": REFRESH_WORKERS,
        "refresh_latency_ms": int(REFRESH_LATENCY_S * 1000),
    }


# 4. Connections per service -----------------------------------------------------------------------


def bench_connections(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ) -> dict[str, Any]:
    from tests.support.network import established_connections_to

    # Seed through a client of its own and close it: only the app's connections remain to be counted.
    with CosmosClient(cosmos.endpoint, credential=cosmos.key) as seeding:
        container = new_container(seeding.get_database_client(database.id), "conns")
        seed(container, INVOCATIONS)
    time.sleep(6)  # idle keep-alive connections of the earlier stages are closed by the server after 5 s
    from localdev.stand_in_manager import Answer, StandInManager

    manager = StandInManager(script=lambda call: Answer(200, {})).start()
    values = app_settings(cosmos, rabbitmq, container.id, manager.url, "conns")
    os.environ.update(values)
    from azure.functions.servicebus import ServiceBusMessage

    import manager_check_handler
    import sync_refresh_handler
    from localdev.local_host import LocalInvocationContext
    from shared import runtime

    runtime.reset()
    keeper, queue = bound_queue(rabbitmq.url, values["RABBITMQ_EXCHANGE"])
    channel = keeper.channel()

    def trigger(body: bytes) -> ServiceBusMessage:
        return ServiceBusMessage(
            body=body, message_id="m", delivery_count=1, application_properties={}, user_properties={}
        )

    # Every HTTP connection the process opens, with the thread that opened it: the Cosmos SDK probes
    # its endpoints from threads of its own at start-up, which can add a connection next to the
    # invocations' one.
    opened: list[tuple[str, int]] = []
    recorder = logging.Handler(logging.DEBUG)
    recorder.emit = lambda record: (  # type: ignore[method-assign]
        opened.append((record.threadName, int(record.args[2]))) if "Starting new" in record.msg else None
    )
    pool_logger = logging.getLogger("urllib3.connectionpool")
    pool_logger.setLevel(logging.DEBUG)
    pool_logger.addHandler(recorder)
    now = utc_now()
    check = make_event(CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)))
    manager_check_handler.main(trigger(check.to_json()), context=LocalInvocationContext("manager_check_handler"))
    invocations = 1
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        if properties.type == "integration.token.refresh-requested" or b"refresh-requested" in body[:300]:
            sync_refresh_handler.main(trigger(body), context=LocalInvocationContext("sync_refresh_handler"))
            invocations += 1
    rabbit = rabbitmq.ctl("list_connections", "client_properties").count("integration-token-refresh")
    counts = {
        "rabbitmq": rabbit,
        "manager_http": manager.sockets_accepted,
        "cosmos": established_connections_to(cosmos.port),
    }
    pool_logger.removeHandler(recorder)
    invocation_thread = threading.current_thread().name

    def opened_to(port: int, by_invocations: bool) -> int:
        return sum(1 for thread, to in opened if to == port and (thread == invocation_thread) == by_invocations)

    by_invocations = {
        "manager_http": opened_to(manager.port, by_invocations=True),
        "cosmos": opened_to(cosmos.port, by_invocations=True),
        "cosmos_sdk_background": opened_to(cosmos.port, by_invocations=False),
    }
    runtime.reset()
    keeper.close()
    manager.stop()
    log(f"connections over {invocations} invocations: {counts}; opened by invocations: {by_invocations}")
    return {
        "connections_per_service": counts,
        "connections_invocations": invocations,
        "connections_opened_by_invocations": by_invocations,
    }


# 5. Imports ---------------------------------------------------------------------------------------


def bench_imports(repeats: int = 7) -> dict[str, Any]:
    timings = {}
    for module in ("azure.functions", "check_expiring_timer", "manager_check_handler", "sync_refresh_handler"):
        code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"
        samples = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], cwd=APP_ROOT, capture_output=True, text=True, check=True
                ).stdout
            )
            for _ in range(repeats)
        ]
        timings[module] = round(statistics.median(samples), 1)
    log(f"imports (median of {repeats}, ms): {timings}")
    return {"import_ms": timings}


# Report -------------------------------------------------------------------------------------------

GOALS = {
    "check_ratio_vs_raw": ("≥", 0.8),
    "check_rss_growth_mib": ("≤", 10),
    "refresh_ratio_vs_raw": ("≥", 0.9),
}


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_reports(results: dict[str, Any]) -> None:
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make bench` (last run {results['date']}) — {results['machine']['platform']}, "
        f"{results['machine']['cpus']} CPUs, {results['machine']['memory_gib']} GiB, Python "
        f"{results['machine']['python']}. Each figure is measured against its baseline in the same run.",
        "",
        *(
            [
                "Runs merged here: "
                + "; ".join(f"{run['date']}: {', '.join(run['figures']) or 'report only'}" for run in results["runs"])
                + ".",
                "",
            ]
            if len(results.get("runs", [])) > 1
            else []
        ),
        "| figure | value | goal | baseline / detail |",
        "|---|---|---|---|",
    ]
    if "check_ratio_vs_raw" in results:
        lines.append(
            f"| check_ratio_vs_raw | {results['check_ratio_vs_raw']} | ≥ 0.8 | "
            f"app {results['check_connections_per_s']:,}/s vs raw {results['check_raw_connections_per_s']:,}/s "
            f"at {results['check_connections']:,} connections |"
        )
    if "check_rss_growth_mib" in results:
        lines.append(
            f"| check_rss_growth_mib | {results['check_rss_growth_mib']} | ≤ 10 | peak RSS growth "
            f"{results['check_rss_growth_small_mib']} MiB at {RSS_SMALL:,}, {results['check_rss_growth_large_mib']} "
            f"MiB at {RSS_LARGE:,} (pages of {RSS_PAGE_SIZE:,}) |"
        )
    if "refresh_ratio_vs_raw" in results:
        lines.append(
            f"| refresh_ratio_vs_raw | {results['refresh_ratio_vs_raw']} | ≥ 0.9 | "
            f"local host {results['refresh_per_s']:,}/s vs raw {results['refresh_raw_per_s']:,}/s; "
            f"{results['refresh_workers']} workers, "
            f"{results['refresh_latency_ms']} ms manager latency, {REFRESH_MESSAGES:,} messages; process CPU per "
            f"refresh {results.get('refresh_cpu_ms', '?')} ms vs {results.get('refresh_raw_cpu_ms', '?')} ms per raw "
            f"call; {results.get('refresh_cosmos_requests', '?')} Cosmos requests per refresh |"
        )
    if "connections_per_service" in results:
        lines.append(
            f"| connections_per_service | {json.dumps(results['connections_per_service'])} | 1 each | over "
            f"{results['connections_invocations']} invocations (established at the end); HTTP connections opened "
            f"by the invocations: {json.dumps(results.get('connections_opened_by_invocations', '?'))} — "
            "`cosmos_sdk_background`: opened by the Cosmos SDK's own start-up endpoint probe |"
        )
    if "import_ms" in results:
        detail = ", ".join(f"`{m}` {ms} ms" for m, ms in results["import_ms"].items())
        lines.append(f"| import_ms | see detail | — | {detail} (median cold import, fresh interpreter) |")
    REPORT.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=["check", "rss", "refresh", "connections", "imports"])
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    only = set(args.only or ([] if args.report_only else ["check", "rss", "refresh", "connections", "imports"]))
    results: dict[str, Any] = {}
    if (args.only or args.report_only) and RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text())  # --only refreshes some figures, keeps the rest
    if args.report_only:
        write_reports(results)
        print(REPORT.read_text())
        return 0
    results |= {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    results["runs"] = [*results.get("runs", []), {"date": results["date"], "figures": sorted(only)}]
    base = Path(tempfile.mkdtemp(prefix="token-refresh-bench-"))
    rabbitmq, cosmos = RabbitMQ(base / "rabbitmq"), CosmosServer(base / "cosmos")
    try:
        rabbitmq.start()
        cosmos.start()
        database = CosmosClient(cosmos.endpoint, credential=cosmos.key).create_database_if_not_exists("bench")
        states_name = f"state_{uuid.uuid4().hex[:6]}"
        states = StateStore(StateStore.ensure_container(database, states_name))
        if "imports" in only:
            results |= bench_imports()
        if "check" in only:
            results |= bench_check(database, states, rabbitmq)
        if "rss" in only:
            results |= bench_rss(database, cosmos, states_name, rabbitmq)
        if "refresh" in only:
            results |= bench_refresh(database, cosmos, rabbitmq)
        if "connections" in only:
            results |= bench_connections(database, cosmos, rabbitmq)
    finally:
        cosmos.stop()
        rabbitmq.stop()
    write_reports(results)
    print(REPORT.read_text())
    missed = [
        name
        for name, (sign, goal) in GOALS.items()
        if name in results and not (results[name] >= goal if sign == "≥" else results[name] <= goal)
    ]
    if missed:
        print(f"goals not met: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
