"""`make bench`: performance figures, each a ratio or count against a baseline measured in the same run.

Writes bench/results.json and bench/RESULTS.md and prints both. Runs against real local services
(RabbitMQ, the Cosmos-compatible server) started here on free loopback ports.

Figures (issue "Scale"):
- check_ratio_vs_raw: connections/s of the check stage (query + publish refresh-requested) at
  20,000 expiring connections / a bare azure-cosmos paged query + bare pika windowed-confirm publish.
- check_rss_growth_mib: peak RSS growth of the check stage at 50,000 minus at 2,000 connections.
- refresh_ratio_vs_durable_raw, refresh_cpu_ratio_vs_durable_raw (issue #14): refreshes/s and process CPU per
  refresh through the local host (2,000 messages, 16 workers, stand-in manager with 20 ms latency) / the
  same-guarantees baseline (bench/durable_baseline.py: the same external work per message, SDKs directly),
  medians of alternating rounds; refresh_ratio_vs_raw: the same / a raw requests.Session loop that only calls;
  refresh_reread_*: the app's projected re-read query against a point read.
- worker_cost_cpu_ms (issue #14): CPU per refresh invocation through the real Functions worker library minus
  calling main() directly (bench/worker_cost.py).
- connections_per_service: connections opened to RabbitMQ, the manager and Cosmos over 500 invocations.
- import_ms: cold import time of each function module in a fresh interpreter, and `import azure.functions`.
- pacing (issue #13): 10,000 expiring connections of 5 integrations with TOKEN_REFRESH_RATE_LIMITS, through the
  check and the local host to a stand-in manager that records every call's time:
  pacing_max_rate_over_limit (most calls in any sliding 1-second window / the limit), pacing_late_tokens (called
  after expiry although the limit allowed them in time), pacing_check_ratio (check throughput with scheduling on
  / off), every connection called exactly once (asserted).

`--only SECTION ...` runs some sections and keeps the other figures of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

from bench.seeding import seed
from bench.worker_cost import bench_worker
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
REFRESH_ROUNDS = 5  # the local host and the same-guarantees baseline, alternating
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


def last_json_line(output: str) -> dict[str, Any]:
    """The probe's result: its last line that is a JSON object (py-spy, when profiling, prints its own lines)."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def profiled(label: str, command: list[str]) -> list[str]:
    """`command`, under py-spy when BENCH_PY_SPY names its executable (docs/development.md#profiling): the
    profile goes to bench/profiles/<label>.txt (collapsed stacks, one process, every thread). py-spy is
    not a project requirement; with it, the figures are slower by its sampling."""
    py_spy = os.environ.get("BENCH_PY_SPY")
    if not py_spy:
        return command
    out = APP_ROOT / "bench" / "profiles" / f"{label}.txt"
    out.parent.mkdir(exist_ok=True)
    log(f"profiling {label} with py-spy into {out.relative_to(APP_ROOT)}")
    return [py_spy, "record", "--format", "raw", "--gil", "--threads", "-o", str(out), "--", *command]


def slow_manager(latency_s: float) -> Any:
    from localdev.stand_in_manager import Answer, StandInManager

    return StandInManager(script=lambda call: Answer(200, delay_s=latency_s)).start()


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
import json, resource, sys, time, warnings
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
from shared.runtime import QUIET_LOGGERS
from shared.third_party_logs import demote_third_party_logs
from datetime import timedelta
import logging
# Logging as `python -m localdev run` sets it up (and Azure logs at Information: host.json): every record
# the app writes is built, formatted, scrubbed of secrets (LocalHost) and written.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
demote_third_party_logs(QUIET_LOGGERS)
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
started, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
summary = host.run_once()  # TOKEN_REFRESH_ENABLED=false: no check, only the queued refresh requests
print(json.dumps({{"refreshed": summary.refreshed, "failed": summary.failed,
                  "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                  "system_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_stime - usage.ru_stime,
                  "context_switches": sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) - getattr(usage, f)
                                          for f in ("ru_nvcsw", "ru_nivcsw")),
                  "cosmos_requests": len(cosmos_requests)}}))
# Leave the broker as it was: quorum queues left behind would slow the rounds after this one.
host.close()
import pika
schedule = host.schedule
with pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url.get_secret_value())) as connection:
    channel = connection.channel()
    for name in [q for f in host.functions for q in (*f.queues, f.dead_letter_queue)] + [
            schedule.queue, *(schedule.delay_queue(s) for s in schedule.delays_s)]:
        channel.queue_delete(name)
"""


def run_refresh_probe(label: str, command: list[str], **options: Any) -> dict[str, Any]:
    """Run a refresh probe (a process of its own, under py-spy when profiling); its timings, once it refreshed every
    message."""
    result = subprocess.run(profiled(label, command), capture_output=True, text=True, check=False, **options)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    timing = last_json_line(result.stdout)
    assert timing["refreshed"] == REFRESH_MESSAGES, timing
    return timing


def per_refresh(timing: dict[str, Any]) -> dict[str, float]:
    """A probe's rate and its process's CPU (all of it, and the kernel's part) and context switches per refresh."""
    refreshed = timing["refreshed"]
    return {
        "per_s": refreshed / timing["seconds"],
        "cpu_ms": timing["cpu_seconds"] * 1000 / refreshed,
        "system_ms": timing["system_seconds"] * 1000 / refreshed,
        "switches": timing["context_switches"] / refreshed,
    }


def refresh_request_bodies(container: Any) -> list[tuple[str, bytes]]:
    """(id, body) of the refresh-requested event of every connection in `container`, as the check publishes them."""
    from shared.expiring_check import refresh_requested_event

    now = utc_now()
    store = ConnectionStore(container, page_size=PAGE_SIZE)
    pages = store.expiring_connection_pages(now + timedelta(hours=1), ("revoked",))
    events = [refresh_requested_event(c, now) for page in pages for c in page.connections]
    return [(event.id, event.to_json()) for event in events]


def durable_raw_refresh(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ, container: Any, manager_url: str):
    """Baseline with the app's guarantees (bench/durable_baseline.py, a process of its own): the same messages,
    the same services, the same concurrency, the SDKs directly."""
    states = database.create_container(f"durable_{uuid.uuid4().hex[:8]}", partition_key=PartitionKey("/id"))
    exchange, queue = f"bench.durable.{uuid.uuid4().hex[:6]}", f"bench.durable.{uuid.uuid4().hex[:6]}"
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True)
        # Outcomes are routed to a durable queue, as the local host's cycle queue takes the app's.
        channel.queue_declare(f"{queue}.outcomes", durable=True)
        channel.queue_bind(f"{queue}.outcomes", exchange, routing_key="integration.token.refreshed")
        channel.confirm_delivery()
        for event_id, body in refresh_request_bodies(container):
            channel.basic_publish(
                "",
                queue,
                body,
                pika.BasicProperties(
                    content_type="application/cloudevents+json",
                    message_id=event_id,
                    type="integration.token.refresh-requested",
                    delivery_mode=pika.DeliveryMode.Persistent,
                ),
            )
    config = {
        "workers": REFRESH_WORKERS,
        "count": REFRESH_MESSAGES,
        "cosmos_endpoint": cosmos.endpoint,
        "cosmos_key": cosmos.key,
        "database": database.id,
        "connections_container": container.id,
        "state_container": states.id,
        "rabbitmq_url": rabbitmq.url,
        "queue": queue,
        "exchange": exchange,
        "manager_url": manager_url,
    }
    script = str(APP_ROOT / "bench" / "durable_baseline.py")
    timing = run_refresh_probe("durable_baseline", [sys.executable, script], input=json.dumps(config))
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        outcomes = channel.queue_declare(f"{queue}.outcomes", passive=True).method.message_count
        assert outcomes == REFRESH_MESSAGES, outcomes  # every outcome published, confirmed and routed
        for name in (queue, f"{queue}.outcomes"):
            channel.queue_delete(name)
        channel.exchange_delete(exchange)
    database.delete_container(states.id)
    return per_refresh(timing)


def app_refresh(
    database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ, container: Any, manager_url: str
) -> dict[str, float]:
    """Refresh-requested messages through the local host (its worker threads run sync_refresh_handler)."""
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
    timing = run_refresh_probe("local_host", [sys.executable, "-c", code], env=os.environ | env)
    database.delete_container(env["COSMOS_STATE_CONTAINER"])  # as the baseline does: each round starts alike
    return per_refresh(timing) | {"cosmos_requests_per_refresh": timing["cosmos_requests"] / timing["refreshed"]}


def reread_costs(container: Any, rounds: int = 3, reads: int = 300) -> dict[str, float]:
    """Client CPU and wall time of the app's re-read (a single-partition query projecting status, expiry and
    `_ts`: no token values leave Cosmos) against a point read of the whole document, one at a time, alternating.
    What choosing the point read would save per refresh."""
    from bench.durable_baseline import REREAD_QUERY

    ids = [
        (row["id"], row["tenantId"])
        for row in container.query_items("SELECT c.id, c.tenantId FROM c", enable_cross_partition_query=True)
    ]
    ids = ids[:reads]

    def query(connection_id: str, tenant: str) -> Any:
        parameters = [{"name": "@id", "value": connection_id}, {"name": "@tenantId", "value": tenant}]
        return list(container.query_items(REREAD_QUERY, parameters=parameters, partition_key=tenant))

    def point(connection_id: str, tenant: str) -> Any:
        return container.read_item(connection_id, partition_key=tenant)

    costs: dict[str, list[tuple[float, float]]] = {"query": [], "point": []}
    for round_ in range(rounds):
        for name in ("query", "point") if round_ % 2 == 0 else ("point", "query"):
            read = query if name == "query" else point
            started, cpu = time.perf_counter(), time.thread_time()  # the SDK works on the calling thread
            for connection_id, tenant in ids:
                read(connection_id, tenant)
            costs[name].append(
                ((time.thread_time() - cpu) * 1000 / len(ids), (time.perf_counter() - started) * 1000 / len(ids))
            )
    figures = {
        f"refresh_reread_{name}_{kind}_ms": round(statistics.median(run[index] for run in runs), 2)
        for name, runs in costs.items()
        for index, kind in enumerate(("cpu", "wall"))
    }
    figures["refresh_reread_point_saving_ms"] = round(
        figures["refresh_reread_query_cpu_ms"] - figures["refresh_reread_point_cpu_ms"], 2
    )
    return figures


def bench_refresh(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ) -> dict[str, Any]:
    manager = slow_manager(REFRESH_LATENCY_S)
    container = new_container(database, "refresh")
    seed(container, REFRESH_MESSAGES)
    durable_runs: list[dict[str, float]] = []
    app_runs: list[dict[str, float]] = []
    try:
        log(f"refresh: raw requests.Session loop, {REFRESH_WORKERS} threads, {REFRESH_MESSAGES:,} calls")
        raw = raw_refresh(manager.url, REFRESH_WORKERS, REFRESH_MESSAGES)
        log(f"refresh: raw {raw['per_s']:,.0f}/s")
        # The same-guarantees baseline and the local host take turns, each going first every other round:
        # on a shared 2-core machine one run alone varies by ~10%, and the Cosmos server slows as it fills.
        rounds = 1 if os.environ.get("BENCH_PY_SPY") else REFRESH_ROUNDS  # a profile needs one
        for round_ in range(rounds):
            order = ("durable", "app") if round_ % 2 == 0 else ("app", "durable")
            for side in order:
                if side == "durable":
                    durable_runs.append(durable_raw_refresh(database, cosmos, rabbitmq, container, manager.url))
                    run = durable_runs[-1]
                    label = "same-guarantees baseline"
                else:
                    app_runs.append(app_refresh(database, cosmos, rabbitmq, container, manager.url))
                    run = app_runs[-1]
                    label = f"local host ({run['cosmos_requests_per_refresh']:.2f} Cosmos requests per refresh)"
                log(
                    f"refresh round {round_ + 1}/{rounds}: {label} {run['per_s']:,.1f}/s, "
                    f"CPU per refresh {run['cpu_ms']:.2f} ms (in the kernel {run['system_ms']:.2f} ms), "
                    f"{run['switches']:.1f} context switches per refresh"
                )
        reread = reread_costs(container)
        log(
            f"refresh: re-read by projected query {reread['refresh_reread_query_cpu_ms']} ms client CPU, by point "
            f"read {reread['refresh_reread_point_cpu_ms']} ms"
        )
    finally:
        manager.stop()
        database.delete_container(container.id)

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    app = {key: median(app_runs, key) for key in ("per_s", "cpu_ms", "cosmos_requests_per_refresh")}
    durable = {key: median(durable_runs, key) for key in ("per_s", "cpu_ms")}
    return {
        "refresh_ratio_vs_durable_raw": round(app["per_s"] / durable["per_s"], 3),
        "refresh_cpu_ratio_vs_durable_raw": round(app["cpu_ms"] / durable["cpu_ms"], 3),
        "refresh_durable_raw_per_s": round(durable["per_s"], 1),
        "refresh_durable_raw_cpu_ms": round(durable["cpu_ms"], 2),
        "refresh_rounds": {
            "app_per_s": [round(run["per_s"], 1) for run in app_runs],
            "app_cpu_ms": [round(run["cpu_ms"], 2) for run in app_runs],
            "durable_raw_per_s": [round(run["per_s"], 1) for run in durable_runs],
            "durable_raw_cpu_ms": [round(run["cpu_ms"], 2) for run in durable_runs],
        },
        "refresh_ratio_vs_raw": round(app["per_s"] / raw["per_s"], 3),
        "refresh_per_s": round(app["per_s"], 1),
        "refresh_raw_per_s": round(raw["per_s"]),
        "refresh_cpu_ms": round(app["cpu_ms"], 2),
        "refresh_raw_cpu_ms": round(raw["cpu_ms"], 2),
        "refresh_cosmos_requests": round(app["cosmos_requests_per_refresh"], 2),
        "refresh_workers": REFRESH_WORKERS,
        "refresh_latency_ms": int(REFRESH_LATENCY_S * 1000),
        **reread,
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

    manager = StandInManager(script=lambda call: Answer(200)).start()
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


# 6. Pacing ---------------------------------------------------------------------------------------
#
# 10,000 expiring connections of 5 integrations with rate limits, through the real path: the check (in a
# process of its own, publishing to RabbitMQ) schedules the refresh requests, the local host (another
# process, 16 workers consuming while the check runs, as refresh instances do in Azure) delivers each at
# its notBefore and refreshes against a stand-in integration-manager (in this process) that records when
# each call arrived. The limits add up to 40/s, well under the ~55-60 refreshes/s the local host does here,
# and each integration has connections in proportion to its limit, so every wave lasts 250 s.

PACING_LIMITS = {"salesforce": 4, "hubspot": 6, "google": 8, "slack": 10, "xero": 12}  # requests/s
PACING_CONNECTIONS = 10_000
PACING_WAVE_S = PACING_CONNECTIONS / sum(PACING_LIMITS.values())  # 250 s at the limits
PACING_EXPIRED_SHARE = 0.03  # already expired when the check starts (up to PACING_EXPIRED_AGO_S ago)
PACING_EXPIRED_AGO_S = 600
# The others expire uniformly between these offsets from the check's start: from 1 minute in to 20 s past
# the end of the wave. In expiry order at the limits, each of them is on time with ~19 s or more to spare
# (the least slack is at the end of the wave); in random order about a third would be late
# (pacing_late_if_unordered).
PACING_EXPIRY_FROM_S, PACING_EXPIRY_TO_S = 60, PACING_WAVE_S + 20
PACING_LATENCY_S = 0.010  # the stand-in manager's answer time
PACING_WORKERS = REFRESH_WORKERS
PACING_SEED_ALLOWANCE_S = 90  # expiries are relative to a start this far after seeding begins; the check waits for it
PACING_SETTLE_S = 5  # after the last expected call: time for a duplicate call to show
PACING_CHECK_ROUNDS = 3  # check throughput: each side (scheduling off / on) this many times, alternating
PACING_UNORDERED_SHUFFLES = 5
PACING_SEED = 13  # issue #13: the same expiries every run


def pacing_limits_setting() -> str:
    return ",".join(f"{integration}={rate}/s" for integration, rate in PACING_LIMITS.items())


def pacing_tokens(start_ms: int, rng: Any) -> dict[str, tuple[str, int]]:
    """The connections to seed: id -> (integrationId, expiresAt in epoch ms), expiries relative to `start_ms`."""
    tokens = {}
    total_rate = sum(PACING_LIMITS.values())
    for integration, rate in PACING_LIMITS.items():
        count = round(PACING_CONNECTIONS * rate / total_rate)
        expired = round(count * PACING_EXPIRED_SHARE)
        for n in range(count):
            if n < expired:
                offset_s = -rng.uniform(0.5, PACING_EXPIRED_AGO_S)
            else:
                offset_s = rng.uniform(PACING_EXPIRY_FROM_S, PACING_EXPIRY_TO_S)
            tokens[f"pace-{integration}-{n:05d}"] = (integration, start_ms + round(offset_s * 1000))
    assert len(tokens) == PACING_CONNECTIONS, len(tokens)
    return tokens


def seed_pacing(container: Any, tokens: dict[str, tuple[str, int]]) -> None:
    def one(item: tuple[int, tuple[str, tuple[str, int]]]) -> None:
        n, (connection_id, (integration, expires_ms)) = item
        container.upsert_item(
            {
                "id": connection_id,
                "tenantId": f"tenant-{n % 50}",
                "integrationId": integration,
                "status": "active",
                "oauth": {
                    "accessToken": "a" * 40,
                    "refreshToken": "r" * 40,
                    "expiresAt": iso(datetime.fromtimestamp(expires_ms / 1000, UTC)),
                },
            }
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, enumerate(tokens.items())))


def max_in_window(times_ms: list[float], window_ms: float = 1000.0) -> int:
    """The most of `times_ms` in any half-open window [t, t + window_ms): the sliding-window count."""
    times = sorted(times_ms)
    best, end = 0, 0
    for start, moment in enumerate(times):
        while end < len(times) and times[end] < moment + window_ms:
            end += 1
        best = max(best, end - start)
    return best


def windows_over(times_ms: list[float], limit: float, window_ms: float = 1000.0) -> int:
    """How many of the windows [t, t + window_ms) that start at a call hold more than `limit` calls."""
    times = sorted(times_ms)
    over, end = 0, 0
    for start, moment in enumerate(times):
        while end < len(times) and times[end] < moment + window_ms:
            end += 1
        over += end - start > limit
    return over


def edf_allowed(expiries: dict[str, int], start_ms: float, rate: float) -> set[str]:
    """The tokens the limit allows to be refreshed in time: in an earliest-deadline-first schedule at `rate`
    from `start_ms` (k-th soonest expiry at start + k / rate), those whose slot is not after their expiry."""
    ordered = sorted(expiries, key=lambda connection_id: expiries[connection_id])
    return {cid for k, cid in enumerate(ordered) if start_ms + k * 1000 / rate <= expiries[cid]}


def late_if_unordered(expiries: dict[str, int], allowed: set[str], start_ms: float, rate: float, seed: int) -> int:
    """Simulation: the same grid at `rate` from `start_ms`, but in random order; how many allowed tokens get
    a slot after their expiry."""
    import random

    order = sorted(expiries)
    random.Random(seed).shuffle(order)  # noqa: S311 - a simulation, not a secret
    return sum(1 for k, cid in enumerate(order) if cid in allowed and start_ms + k * 1000 / rate > expiries[cid])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def delay_summary(delays: list[float]) -> dict[str, int]:
    if not delays:
        return {}
    return {
        "p50": round(percentile(delays, 0.5)),
        "p99": round(percentile(delays, 0.99)),
        "max": round(max(delays)),
        "min": round(min(delays)),
    }


def pacing_figures(
    tokens: dict[str, tuple[str, int]],
    calls: dict[str, list[float]],
    scheduled: dict[str, dict[str, Any]],
    start_ms: float,
) -> dict[str, Any]:
    """Per integration and overall, from the seeded expiries, the manager's call times (epoch ms) and the check's
    schedule (`scheduled`: connection id -> {"at": notBefore or requestedAt in epoch ms, "notBefore": bool}).
    Times of calls are their first call's (the bench asserts there is exactly one)."""
    rows = []
    second_half_ms = start_ms + PACING_WAVE_S * 500  # requests scheduled after mid-wave: far from the check's burst
    for integration, rate in PACING_LIMITS.items():
        expiries = {cid: expires for cid, (owner, expires) in tokens.items() if owner == integration}
        times = {cid: calls[cid][0] for cid in expiries if calls.get(cid)}
        at = {cid: scheduled[cid]["at"] for cid in times if cid in scheduled}
        allowed = edf_allowed(expiries, start_ms, rate)
        late = {cid for cid, moment in times.items() if moment > expiries[cid]}
        unordered = [
            late_if_unordered(expiries, allowed, start_ms, rate, PACING_SEED + shuffle)
            for shuffle in range(PACING_UNORDERED_SHUFFLES)
        ]
        delays = {cid: times[cid] - at[cid] for cid in at}
        second_half = [cid for cid in at if at[cid] >= second_half_ms]
        peak = max_in_window(list(times.values()))
        rows.append(
            {
                "integration": integration,
                "limit_per_s": rate,
                "connections": len(expiries),
                "calls": sum(len(calls.get(cid, [])) for cid in expiries),
                "first_call_s": round((min(times.values()) - start_ms) / 1000, 2),
                "last_call_s": round((max(times.values()) - start_ms) / 1000, 2),
                "max_calls_in_1s": peak,
                "rate_over_limit": round(peak / rate, 3),
                "windows_over_limit": windows_over(list(times.values()), rate),
                "max_calls_in_1s_second_half": max_in_window([times[cid] for cid in second_half]),
                "rate_over_limit_10s": round(max_in_window(list(times.values()), 10_000.0) / (10 * rate), 3),
                "scheduled_max_in_1s": max_in_window([s["at"] for cid, s in scheduled.items() if cid in expiries]),
                "late": len(late),
                "late_allowed": len(late & allowed),
                "not_allowed": len(expiries) - len(allowed),
                "late_if_unordered": round(statistics.median(unordered)),
                "delivery_delay_ms": delay_summary(list(delays.values())),
                "delivery_delay_second_half_ms": delay_summary([delays[cid] for cid in second_half]),
            }
        )
    # The start-up backlog: the last scheduled time whose request reached the manager more than 1 s after it.
    behind = [
        scheduled[cid]["at"]
        for cid, times in calls.items()
        if cid in scheduled and times[0] - scheduled[cid]["at"] > 1000
    ]
    all_delays = [times[0] - scheduled[cid]["at"] for cid, times in calls.items() if cid in scheduled]
    return {
        "pacing_max_rate_over_limit": max(row["rate_over_limit"] for row in rows),
        "pacing_late_tokens": sum(row["late_allowed"] for row in rows),
        "pacing_late_if_unordered": sum(row["late_if_unordered"] for row in rows),
        "pacing_delivered_over_1s_late": len(behind),
        "pacing_over_1s_late_until_s": round((max(behind) - start_ms) / 1000, 1) if behind else None,
        "pacing_max_delivery_delay_s": round(max(all_delays) / 1000, 2) if all_delays else None,
        "pacing_integrations": rows,
    }


PACING_HOST_PROBE = """
import logging, sys, threading, warnings
sys.path.insert(0, {root!r})
from urllib3.exceptions import InsecureRequestWarning
warnings.filterwarnings("ignore", category=InsecureRequestWarning)
from localdev.local_host import LocalHost
from shared import runtime
from shared.settings import load_settings
from shared.third_party_logs import demote_third_party_logs
# As `python -m localdev run` logs: INFO, the SDKs' own records at DEBUG.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
demote_third_party_logs(runtime.QUIET_LOGGERS)
host = LocalHost(load_settings(), queue_prefix={prefix!r}, workers={workers})
host.connect()  # declares the queues before the check publishes
print("PACING-HOST-READY", flush=True)
threading.Thread(target=lambda: (sys.stdin.readline(), host.stop()), daemon=True).start()
host.run_forever(tick_seconds=3600)  # TOKEN_REFRESH_ENABLED=false: the timer publishes nothing
print("PACING-HOST-STOPPED", flush=True)
"""

PACING_CHECK_PROBE = """
import json, resource, sys, time, warnings
sys.path.insert(0, {root!r})
from datetime import timedelta
from urllib3.exceptions import InsecureRequestWarning
warnings.filterwarnings("ignore", category=InsecureRequestWarning)
from shared import runtime
from shared.events import REFRESH_REQUESTED, CheckExpiringData
from shared.expiring_check import request_refresh_for_expiring_connections
from shared.times import parse_time, utc_now
settings = runtime.settings()
store, states, publisher = runtime.connection_store(), runtime.state_store(), runtime.publisher()
scheduled = {{}}

class RecordingPublisher:  # records each request's time; the events go on to RabbitMQ unchanged
    def publish(self, events):
        events = list(events)
        for event in events:
            if event.type == REFRESH_REQUESTED:
                at = event.data.get("notBefore") or event.data["requestedAt"]
                scheduled[event.data["connectionId"]] = {{
                    "at": parse_time(at).timestamp() * 1000, "notBefore": "notBefore" in event.data}}
        return publisher.publish(events)

time.sleep(max(0.0, {start_at} - time.time()))  # warm clients, then start at the time the expiries are set from
started = time.time()
now = utc_now()
check = CheckExpiringData(timestamp=now, threshold_time=now + timedelta(seconds={threshold_s}))
summary = request_refresh_for_expiring_connections(
    check, store=store, states=states, publisher=RecordingPublisher(), settings=settings)
finished = time.time()
runtime.reset()
print(json.dumps({{
    "started_ms": started * 1000, "finished_ms": finished * 1000, "published": summary.published,
    "pages": summary.pages, "late": summary.late, "waiting": summary.waiting,
    "schedules": {{s.integration_id: {{"first_ms": s.first_ms, "last_ms": s.last_ms, "scheduled": s.scheduled,
                                     "late": s.late}} for s in summary.schedules}},
    "scheduled": scheduled}}))
"""


def start_pacing_host(env: dict[str, str], base: Path) -> tuple[subprocess.Popen, Path]:
    """The local host in a process of its own, consuming until a line arrives on its stdin."""
    code = PACING_HOST_PROBE.format(root=str(APP_ROOT), prefix=f"bench-{uuid.uuid4().hex[:6]}.", workers=PACING_WORKERS)
    log_path = base / "pacing-host.log"
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", code], env=os.environ | env, stdin=subprocess.PIPE, stdout=output, stderr=output
        )
    deadline = time.monotonic() + 120
    while b"PACING-HOST-READY" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the local host did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return process, log_path


def stop_pacing_host(process: subprocess.Popen, log_path: Path) -> None:
    try:
        process.communicate(b"stop\n", timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        log(f"pacing: the local host did not stop within 60 s; killed (log: {log_path})")


def wait_for_calls(
    calls: dict[str, list[float]], expected: int, deadline_ms: float, host: subprocess.Popen
) -> list[float]:
    """Until every connection was called, the host died, or `deadline_ms` (epoch) passed; progress every 30 s.
    Returns the machine's 1-minute load average, sampled every 5 s meanwhile (other work on the machine delays
    deliveries)."""
    last_report = last_sample = time.monotonic()
    load = [os.getloadavg()[0]]
    while len(calls) < expected and time.time() * 1000 < deadline_ms and host.poll() is None:
        time.sleep(0.5)
        if time.monotonic() - last_sample >= 5:
            last_sample = time.monotonic()
            load.append(os.getloadavg()[0])
        if time.monotonic() - last_report >= 30:
            last_report = time.monotonic()
            log(f"pacing: {len(calls):,} of {expected:,} connections called (load average {load[-1]:.1f})")
    return load


def run_pacing_wave(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ, base: Path) -> dict[str, Any]:
    """Seed, run the check and the local host, return the figures and the container (for the check throughput)."""
    import random
    from collections import defaultdict

    from localdev.stand_in_manager import Answer, StandInManager

    calls: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def record(call: Any) -> Answer:
        at = time.time() * 1000  # on arrival (the script runs as the request comes in)
        with lock:
            calls[call.connection_id].append(at)
        return Answer(200, delay_s=PACING_LATENCY_S)

    container = new_container(database, "pacing")
    manager = StandInManager(script=record).start()
    env = app_settings(cosmos, rabbitmq, container.id, manager.url, "pacing") | {
        "TOKEN_REFRESH_ENABLED": "false",  # the bench runs the check itself, in a process of its own
        "TOKEN_REFRESH_RATE_LIMITS": pacing_limits_setting(),
        "TOKEN_REFRESH_PAGE_SIZE": str(PAGE_SIZE),
        "TOKEN_REFRESH_CHECK_TIME_BUDGET_MS": "3600000",
        "ServiceBusConnection": "",
        "ServiceBusConnection__fullyQualifiedNamespace": "",
    }
    host, host_log = start_pacing_host(env, base)
    try:
        start_at = time.time() + PACING_SEED_ALLOWANCE_S
        tokens = pacing_tokens(round(start_at * 1000), random.Random(PACING_SEED))  # noqa: S311 - test data
        log(f"pacing: seeding {len(tokens):,} connections, limits {pacing_limits_setting()}")
        seed_pacing(container, tokens)
        if time.time() > start_at:
            log(f"pacing: seeding took longer than {PACING_SEED_ALLOWANCE_S} s; the check starts late")
        log(f"pacing: the check starts in {max(0.0, start_at - time.time()):.0f} s; the local host refreshes meanwhile")
        code = PACING_CHECK_PROBE.format(root=str(APP_ROOT), start_at=start_at, threshold_s=PACING_EXPIRY_TO_S + 600)
        result = subprocess.run(
            [sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True, check=False
        )
        (base / "pacing-check.log").write_text(result.stderr)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        check = last_json_line(result.stdout)
        start_ms = check["started_ms"]
        log(
            f"pacing: check published {check['published']:,} requests in {(check['finished_ms'] - start_ms) / 1000:.1f}"
            f" s ({check['pages']} pages; started {(start_ms / 1000 - start_at):+.2f} s from the planned start); "
            f"it counted {check['late']} late"
        )
        assert check["published"] == PACING_CONNECTIONS, check["published"]
        last_slot_ms = max(entry["at"] for entry in check["scheduled"].values())
        load = wait_for_calls(calls, PACING_CONNECTIONS, last_slot_ms + 180_000, host)
        time.sleep(PACING_SETTLE_S)
    finally:
        stop_pacing_host(host, host_log)
        manager.stop()
    wave_s = (max(max(times) for times in calls.values()) - start_ms) / 1000 if calls else 0.0
    raw = base / "pacing-raw.json"  # everything the figures come from, to look into a run
    raw.write_text(json.dumps({"tokens": tokens, "calls": calls, "check": check}))
    missing = sorted(set(tokens) - set(calls))
    repeated = {cid: len(times) for cid, times in calls.items() if len(times) != 1}
    unknown = sorted(set(calls) - set(tokens))
    if missing or repeated or unknown:
        examples = [
            f"{cid} (scheduled {(check['scheduled'].get(cid, {}).get('at', math.nan) - start_ms) / 1000:+.1f} s, "
            f"expires {(tokens[cid][1] - start_ms) / 1000:+.1f} s)"
            for cid in missing[:5]
        ]
        raise AssertionError(
            f"pacing: every connection must be called exactly once: {len(missing)} never called (e.g. {examples}), "
            f"{len(repeated)} called more than once (e.g. {list(repeated.items())[:3]}), {len(unknown)} unknown; "
            f"data in {raw}, host log {host_log}"
        )
    figures = pacing_figures(tokens, calls, check["scheduled"], start_ms)
    for row in figures["pacing_integrations"]:
        row["origin_lag_ms"] = round(check["schedules"][row["integration"]]["first_ms"] - start_ms)
    log(
        f"pacing: {sum(len(t) for t in calls.values()):,} calls, each connection once; wave {wave_s:.0f} s; "
        f"max rate/limit {figures['pacing_max_rate_over_limit']}; late though allowed "
        f"{figures['pacing_late_tokens']} (in random order: {figures['pacing_late_if_unordered']})"
    )
    return figures | {
        "pacing_connections": PACING_CONNECTIONS,
        "pacing_calls": sum(len(times) for times in calls.values()),
        "pacing_each_called_once": True,
        "pacing_wave_s": round(wave_s, 1),
        "pacing_check_s": round((check["finished_ms"] - start_ms) / 1000, 1),
        "pacing_check_late": check["late"],
        "pacing_load_average": {"max": round(max(load), 2), "mean": round(statistics.mean(load), 2)},
        "pacing_workers": PACING_WORKERS,
        "pacing_latency_ms": int(PACING_LATENCY_S * 1000),
        "pacing_limits": dict(PACING_LIMITS),
        "container": container,
    }


def timed_check(database: Any, container: Any, url: str, exchange: str, *, scheduling: bool) -> tuple[int, float]:
    """One check over `container` with a state container of its own (a pacing document left by an earlier run would
    make the next one find its requests waiting); returns (published, seconds)."""
    states_name = f"state_{uuid.uuid4().hex[:6]}"
    states = StateStore(StateStore.ensure_container(database, states_name))
    extra = {"TOKEN_REFRESH_RATE_LIMITS": pacing_limits_setting()} if scheduling else {}
    settings = load_settings(BENCH_SETTINGS | extra)
    logging.getLogger("shared.refresh_schedule").setLevel(logging.ERROR)  # every token is late by now: 5 warnings
    started = time.perf_counter()
    publisher = EventPublisher([RabbitMqTransport(url, exchange, confirm_window=CONFIRM_WINDOW)])
    now = utc_now()
    summary = request_refresh_for_expiring_connections(
        CheckExpiringData(timestamp=now, threshold_time=now + timedelta(hours=1)),
        store=ConnectionStore(container, PAGE_SIZE),
        states=states,
        publisher=publisher,
        settings=settings,
    )
    publisher.close()
    seconds = time.perf_counter() - started
    database.delete_container(states_name)
    return summary.published, seconds


def timed_scan(container: Any, *, soonest_first: bool) -> float:
    """The check's scan alone (every page, no selection, no publish), in expiresAt order or not: seconds."""
    store = ConnectionStore(container, PAGE_SIZE)
    started = time.perf_counter()
    pages = store.expiring_connection_pages(
        utc_now() + timedelta(hours=1), load_settings(BENCH_SETTINGS).skip_statuses, soonest_first=soonest_first
    )
    count = sum(len(page.connections) for page in pages)
    seconds = time.perf_counter() - started
    assert count == PACING_CONNECTIONS, count
    return seconds


def bench_pacing_check(database: Any, container: Any, rabbitmq: RabbitMQ) -> dict[str, Any]:
    """Check-only throughput over the same connections, scheduling off and on, alternating; and the scan alone,
    unordered and in expiresAt order (what ORDER BY costs the Cosmos-compatible server)."""
    exchange = f"bench.pacing-check.{uuid.uuid4().hex[:6]}"
    keeper, queue = bound_queue(rabbitmq.url, exchange)
    keeper.close()
    rates: dict[str, list[float]] = {"off": [], "on": [], "scan": [], "scan_ordered": []}
    for round_ in range(PACING_CHECK_ROUNDS):
        order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
        for name in order:
            count, seconds = timed_check(database, container, rabbitmq.url, exchange, scheduling=name == "on")
            assert count == PACING_CONNECTIONS, (name, count)
            rates[name].append(count / seconds)
            purge(rabbitmq.url, queue)
        for name in ("scan", "scan_ordered") if round_ % 2 == 0 else ("scan_ordered", "scan"):
            rates[name].append(PACING_CONNECTIONS / timed_scan(container, soonest_first=name == "scan_ordered"))
        log(
            f"pacing check round {round_ + 1}: scheduling off {rates['off'][-1]:,.0f}, on {rates['on'][-1]:,.0f} "
            f"connections/s; scan alone {rates['scan'][-1]:,.0f}, in expiresAt order {rates['scan_ordered'][-1]:,.0f}/s"
        )
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "pacing_check_ratio": round(median["on"] / median["off"], 3),
        "pacing_check_per_s_on": round(median["on"]),
        "pacing_check_per_s_off": round(median["off"]),
        "pacing_scan_ordered_ratio": round(median["scan_ordered"] / median["scan"], 3),
        "pacing_check_samples": {name: [round(rate) for rate in values] for name, values in rates.items()},
    }


def bench_pacing(database: Any, cosmos: CosmosServer, rabbitmq: RabbitMQ, base: Path) -> dict[str, Any]:
    started = time.perf_counter()
    results = run_pacing_wave(database, cosmos, rabbitmq, base)
    container = results.pop("container")
    results |= bench_pacing_check(database, container, rabbitmq)
    database.delete_container(container.id)
    results["pacing_wall_s"] = round(time.perf_counter() - started)
    log(f"pacing: section took {results['pacing_wall_s']} s")
    return results


# Report -------------------------------------------------------------------------------------------

GOALS = {
    "check_ratio_vs_raw": ("≥", 0.8),
    "check_rss_growth_mib": ("≤", 10),
    "refresh_ratio_vs_raw": ("≥", 0.9),
    "refresh_ratio_vs_durable_raw": ("≥", 0.9),
    "refresh_cpu_ratio_vs_durable_raw": ("≤", 1.15),
    "refresh_cosmos_requests": ("≤", 3),
    "pacing_max_rate_over_limit": ("≤", 1.10),
    "pacing_late_tokens": ("≤", 0),
    "pacing_check_ratio": ("≥", 0.9),
}


def goal_met(name: str, value: float) -> bool:
    sign, goal = GOALS[name]
    return value >= goal if sign == "≥" else value <= goal


def goal_text(name: str, results: dict[str, Any]) -> str:
    """The goal column: the goal and whether this run met it."""
    sign, goal = GOALS[name]
    if name not in results:
        return f"{sign} {goal}"
    return f"{sign} {goal}: {'met' if goal_met(name, results[name]) else '**not met**'}"


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
            f"| check_ratio_vs_raw | {results['check_ratio_vs_raw']} | {goal_text('check_ratio_vs_raw', results)} | "
            f"app {results['check_connections_per_s']:,}/s vs raw {results['check_raw_connections_per_s']:,}/s "
            f"at {results['check_connections']:,} connections |"
        )
    if "check_rss_growth_mib" in results:
        lines.append(
            f"| check_rss_growth_mib | {results['check_rss_growth_mib']} | "
            f"{goal_text('check_rss_growth_mib', results)} | peak RSS growth "
            f"{results['check_rss_growth_small_mib']} MiB at {RSS_SMALL:,}, {results['check_rss_growth_large_mib']} "
            f"MiB at {RSS_LARGE:,} (pages of {RSS_PAGE_SIZE:,}) |"
        )
    if "refresh_ratio_vs_raw" in results:
        lines.append(
            f"| refresh_ratio_vs_raw | {results['refresh_ratio_vs_raw']} | "
            f"{goal_text('refresh_ratio_vs_raw', results)} | "
            f"local host {results['refresh_per_s']:,}/s vs raw {results['refresh_raw_per_s']:,}/s; "
            f"{results['refresh_workers']} workers, "
            f"{results['refresh_latency_ms']} ms manager latency, {REFRESH_MESSAGES:,} messages; process CPU per "
            f"refresh {results.get('refresh_cpu_ms', '?')} ms vs {results.get('refresh_raw_cpu_ms', '?')} ms per raw "
            f"call; {results.get('refresh_cosmos_requests', '?')} Cosmos requests per refresh |"
        )
    if "refresh_ratio_vs_durable_raw" in results:
        rounds = results["refresh_rounds"]
        lines += [
            f"| refresh_ratio_vs_durable_raw | {results['refresh_ratio_vs_durable_raw']} | "
            f"{goal_text('refresh_ratio_vs_durable_raw', results)} | local host {results['refresh_per_s']}/s vs the "
            f"same-guarantees baseline {results['refresh_durable_raw_per_s']}/s (bench/durable_baseline.py: the same "
            "re-read, claim, call, confirmed publish, finished claim and ack per message, SDKs directly); medians of "
            f"{len(rounds['app_per_s'])} alternating rounds: local host {rounds['app_per_s']}, baseline "
            f"{rounds['durable_raw_per_s']} |",
            f"| refresh_cpu_ratio_vs_durable_raw | {results['refresh_cpu_ratio_vs_durable_raw']} | "
            f"{goal_text('refresh_cpu_ratio_vs_durable_raw', results)} | process CPU per refresh: local host "
            f"{results['refresh_cpu_ms']} ms vs baseline {results['refresh_durable_raw_cpu_ms']} ms (rounds: "
            f"{rounds['app_cpu_ms']} vs {rounds['durable_raw_cpu_ms']}) |",
            f"| refresh_cosmos_requests | {results['refresh_cosmos_requests']} | "
            f"{goal_text('refresh_cosmos_requests', results)} | Cosmos requests per refresh of the local host "
            "(re-read, claim, finished claim) |",
        ]
    if "refresh_reread_query_cpu_ms" in results:
        lines.append(
            f"| refresh_reread_point_saving_ms | {results['refresh_reread_point_saving_ms']} | — | what a point read "
            "would save per refresh over the app's projected re-read query (which keeps token values in Cosmos): "
            f"client CPU {results['refresh_reread_query_cpu_ms']} vs {results['refresh_reread_point_cpu_ms']} ms, "
            f"wall {results['refresh_reread_query_wall_ms']} vs {results['refresh_reread_point_wall_ms']} ms, one "
            "at a time |"
        )
    if "worker_cost_cpu_ms" in results:
        lines.append(
            f"| worker_cost_cpu_ms | {results['worker_cost_cpu_ms']} | — | per sync_refresh_handler invocation, "
            f"process CPU through the real Functions worker library {results['worker_invocation_cpu_ms']} ms vs "
            f"main() called directly {results['direct_invocation_cpu_ms']} ms; wall "
            f"{results['worker_invocation_wall_ms']} vs {results['direct_invocation_wall_ms']} ms (cost "
            f"{results['worker_cost_wall_ms']} ms); medians of {len(results['worker_blocks']['worker_cpu_ms'])} "
            f"alternating blocks, {results['worker_invocations']} invocations a side (bench/worker_cost.py) |"
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
    if "pacing_max_rate_over_limit" in results:
        lines += pacing_report(results)
    REPORT.write_text("\n".join(lines) + "\n")


def pacing_report(results: dict[str, Any]) -> list[str]:
    """The Pacing section of RESULTS.md: the figures with their goals, then two tables by integration."""
    rows = results["pacing_integrations"]
    limits = ",".join(f"{row['integration']}={row['limit_per_s']}/s" for row in rows)
    samples = results.get("pacing_check_samples", {})
    lines = [
        "",
        "## Pacing",
        "",
        f"{results['pacing_connections']:,} expiring connections of {len(rows)} integrations, "
        f"`TOKEN_REFRESH_RATE_LIMITS={limits}`, connections in proportion to the limits (each wave "
        f"{PACING_WAVE_S:.0f} s at its limit); {PACING_EXPIRED_SHARE:.0%} already expired when the check starts, the "
        f"others expiring uniformly from +{PACING_EXPIRY_FROM_S} s to +{PACING_EXPIRY_TO_S:.0f} s. The check runs in "
        "a process of its own and publishes to RabbitMQ; the local host "
        f"({results['pacing_workers']} workers, consuming while the check runs) delivers each request at its "
        f"`notBefore` and refreshes against a stand-in integration-manager ({results['pacing_latency_ms']} ms "
        "latency) that records when each call arrives. Times are offsets from the check's start.",
        "",
        "| figure | value | goal | detail |",
        "|---|---|---|---|",
        f"| pacing_max_rate_over_limit | {results['pacing_max_rate_over_limit']} | "
        f"{goal_text('pacing_max_rate_over_limit', results)} | most calls in any sliding 1-second window ÷ the "
        "integration's limit, highest over the integrations (as scheduled, the most in any second is the limit: "
        "see the tables) |",
        f"| pacing_late_tokens | {results['pacing_late_tokens']} | {goal_text('pacing_late_tokens', results)} | "
        "tokens called after their expiresAt although the limit allowed them in time (their slot in an "
        "earliest-deadline-first schedule at the limit, from the check's start, is not after their expiry); "
        f"paced in random order, {results['pacing_late_if_unordered']:,} such tokens would be late "
        f"(`pacing_late_if_unordered`, simulated, median of {PACING_UNORDERED_SHUFFLES} shuffles) |",
        f"| pacing_check_ratio | {results['pacing_check_ratio']} | {goal_text('pacing_check_ratio', results)} | "
        f"check only (query + selection + schedule + publish to RabbitMQ), same {results['pacing_connections']:,} "
        f"connections, scheduling on {results['pacing_check_per_s_on']:,}/s ÷ off "
        f"{results['pacing_check_per_s_off']:,}/s, median of {len(samples.get('on', []))} runs each, alternating, "
        f"each with a fresh state container (on: {samples.get('on')}, off: {samples.get('off')}). The scan alone "
        f"in expiresAt order (`ORDER BY`, which scheduling needs) ÷ unordered on the Cosmos-compatible server: "
        f"{results.get('pacing_scan_ordered_ratio', '?')} (`pacing_scan_ordered_ratio`; ordered "
        f"{samples.get('scan_ordered')}, unordered {samples.get('scan')}/s) |",
        f"| pacing_calls | {results['pacing_calls']:,} | = connections | every connection called exactly once "
        f"(asserted); last call {results['pacing_wave_s']} s after the check's start; the check took "
        f"{results['pacing_check_s']} s and counted {results['pacing_check_late']} requests it scheduled after their "
        f"expiry; the section took {results.get('pacing_wall_s', '?')} s; the machine's 1-minute load average "
        f"during the wave: mean {results.get('pacing_load_average', {}).get('mean')}, max "
        f"{results.get('pacing_load_average', {}).get('max')} ({results['machine']['cpus']} CPUs) |",
        f"| pacing_delivered_over_1s_late | {results.get('pacing_delivered_over_1s_late', '?'):,} | — | requests "
        "that reached the manager more than 1 s after their `notBefore`; the last of them was scheduled for "
        f"+{results.get('pacing_over_1s_late_until_s')} s; the longest delay "
        f"{results.get('pacing_max_delivery_delay_s')} s |",
        "",
        "| integration | limit/s | connections | first call s | last call s | max calls in any 1 s | ÷ limit | "
        "late | late but allowed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['integration']} | {row['limit_per_s']} | {row['connections']:,} | {row['first_call_s']} | "
            f"{row['last_call_s']} | {row['max_calls_in_1s']} | {row['rate_over_limit']} | {row['late']} | "
            f"{row['late_allowed']} |"
        )
    lines += [
        "",
        "Where the calls left the schedule:",
        "",
        "| integration | max in 1 s as scheduled | 1-s windows over the limit | max in 1 s, 2nd half | "
        "max in 10 s ÷ (10 s at the limit) | delivery delay ms p50 / p99 / max | same, 2nd half | "
        "schedule starts at ms | not allowed | late if unordered |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delay, steady = row["delivery_delay_ms"], row.get("delivery_delay_second_half_ms", {})
        lines.append(
            f"| {row['integration']} | {row['scheduled_max_in_1s']} | {row['windows_over_limit']:,} of "
            f"{row['calls']:,} | {row.get('max_calls_in_1s_second_half', '?')} | {row['rate_over_limit_10s']} | "
            f"{delay.get('p50')} / {delay.get('p99')} / {delay.get('max')} | "
            f"{steady.get('p50')} / {steady.get('p99')} / {steady.get('max')} | {row.get('origin_lag_ms', '?')} | "
            f"{row['not_allowed']} | {row['late_if_unordered']} |"
        )
    lines += [
        "",
        "*late*: called after expiresAt; *late but allowed*: of those, the ones the limit allowed in time "
        "(`pacing_late_tokens`); *not allowed*: expired before the limit could reach them (already expired, or too "
        "many expiring too soon); *1-s windows over the limit*: of the 1-second windows that start at a call, "
        "those holding more calls than the limit (at 4/s one call too many is already 1.25 times the limit); "
        "*2nd half*: requests scheduled in the second half of the wave, far from the check's own burst of "
        "publishing; *delivery delay*: the manager's call time minus the request's `notBefore` (the host's "
        "release, its queue, the function's re-read and claim); *schedule starts at*: the integration's first "
        "slot, from the check's start.",
    ]
    return lines


SECTIONS = ["check", "rss", "refresh", "worker", "connections", "imports", "pacing"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", choices=SECTIONS, metavar="SECTION", help=f"run only these sections: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    only = set(args.only or ([] if args.report_only else SECTIONS))
    results: dict[str, Any] = {}
    if (args.only or args.report_only) and RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text())  # --only refreshes some figures, keeps the rest
    if args.report_only:
        write_reports(results)
        print(REPORT.read_text())
        return 0
    results |= {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    # Earlier runs keep only the figures this run does not measure again.
    earlier = [run | {"figures": sorted(set(run["figures"]) - only)} for run in results.get("runs", [])]
    results["runs"] = [*(run for run in earlier if run["figures"]), {"date": results["date"], "figures": sorted(only)}]
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
        if "worker" in only:
            results |= bench_worker(database, cosmos, rabbitmq, log)
        if "connections" in only:
            results |= bench_connections(database, cosmos, rabbitmq)
        if "pacing" in only:
            results |= bench_pacing(database, cosmos, rabbitmq, base)
    finally:
        cosmos.stop()
        rabbitmq.stop()
    write_reports(results)
    print(REPORT.read_text())
    missed = [name for name in GOALS if name in results and not goal_met(name, results[name])]
    if missed:
        print(f"goals not met: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
