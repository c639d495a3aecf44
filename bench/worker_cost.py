"""Bench section "worker": what the real Azure Functions Python worker costs per refresh invocation.

Every invocation in Azure goes through the worker library (`azure-functions-runtime-v1`): it turns the host's
InvocationRequest into a ServiceBusMessage and a Context, hops from its event loop to its thread pool and back,
and builds the response. Here the same sync_refresh_handler invocations run through the real worker (driven
in-process like tests/integration/test_real_worker.py does, tests/support/functions_worker.py) and by calling
its main() directly, in alternating blocks in one process; the difference per invocation, in process CPU and
in wall time, is the worker's own cost. The host's gRPC transport and log forwarding are not in it (the
in-process driver has none), so it is a lower bound of what an Azure invocation pays on top of our code.

The measurement runs in a process of its own (`python bench/worker_cost.py '<json config>'`, started by
`bench_worker`): the worker is a process-wide singleton.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parent.parent
if str(APP_ROOT) not in sys.path:
    sys.path.insert(0, str(APP_ROOT))

FUNCTION = "sync_refresh_handler"
REFRESHED = "integration.token.refreshed"
BLOCKS = 10  # per side, alternating: worker, direct, direct, worker, ...
BLOCK_SIZE = 50  # invocations per block, one after the other
WARMUP = 5  # invocations each way before the blocks, not counted: client creation, first imports


# The parent: services, seed, subprocess, checks ------------------------------------------------------------


def bench_worker(
    database: Any,
    cosmos: Any,
    rabbitmq: Any,
    log: Callable[[str], None],
    *,
    blocks: int = BLOCKS,
    block_size: int = BLOCK_SIZE,
    warmup: int = WARMUP,
) -> dict[str, Any]:
    """Run the measurement in a subprocess against the bench's services; the figures, after checking that every
    invocation refreshed its connection and published its outcome exactly once."""
    import pika
    from azure.cosmos import PartitionKey
    from azure.cosmos.exceptions import CosmosResourceNotFoundError

    from bench.seeding import seed
    from localdev.stand_in_manager import Answer, StandInManager

    started = time.perf_counter()
    total = 2 * (warmup + blocks * block_size)  # every invocation refreshes a connection of its own
    container = database.create_container(f"worker_{uuid.uuid4().hex[:8]}", partition_key=PartitionKey("/tenantId"))
    manager = StandInManager(script=lambda call: Answer(200)).start()  # no latency: our code + services
    env = {
        "COSMOS_ENDPOINT": cosmos.endpoint,
        "COSMOS_KEY": cosmos.key,
        "COSMOS_EMULATOR": "true",
        "COSMOS_DATABASE": database.id,
        "COSMOS_CONNECTIONS_CONTAINER": container.id,
        "COSMOS_STATE_CONTAINER": f"state_{uuid.uuid4().hex[:6]}",
        "RABBITMQ_URL": rabbitmq.url,
        "RABBITMQ_EXCHANGE": f"bench.worker.{uuid.uuid4().hex[:6]}",
        "INTEGRATION_MANAGER_URL": manager.url,
        "TOKEN_REFRESH_ENABLED": "false",
        # Outcomes go to RabbitMQ only: no Service Bus client in the figures.
        "ServiceBusConnection": "",
        "ServiceBusConnection__fullyQualifiedNamespace": "",
    }
    queue = f"bench.worker.outcomes.{uuid.uuid4().hex[:6]}"
    try:
        log(f"worker: seeding {total:,} expiring connections")
        seed(container, total, prefix="w")
        # Bound before the run: every outcome published from here on is kept, to be counted.
        with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
            channel = connection.channel()
            channel.exchange_declare(env["RABBITMQ_EXCHANGE"], exchange_type="topic", durable=True)
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, env["RABBITMQ_EXCHANGE"], routing_key=REFRESHED)
        log(f"worker: {blocks} blocks of {block_size} invocations each side, through the worker and direct")
        config = {"blocks": blocks, "block_size": block_size, "warmup": warmup}
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(config)],
            cwd=APP_ROOT,  # like the host, which starts the worker in the app's root
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"worker bench failed:\n{result.stderr[-3000:]}")
        timing = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
        with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
            outcomes = connection.channel().queue_declare(queue, passive=True).method.message_count
        called = [call.connection_id for call in manager.calls]
        # A benchmark of failures must not pass: one call and one outcome per invocation, none twice.
        if not (outcomes == len(called) == len(set(called)) == timing["invocations"] == total):
            raise RuntimeError(
                f"worker bench: {total} invocations expected, {timing['invocations']} run, {len(called)} manager "
                f"calls ({len(set(called))} connections), {outcomes} refreshed outcomes"
            )
    finally:
        manager.stop()
        with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.exchange_delete(env["RABBITMQ_EXCHANGE"])
        for name in (container.id, env["COSMOS_STATE_CONTAINER"]):
            with contextlib.suppress(CosmosResourceNotFoundError):  # the state container exists once the app ran
                database.delete_container(name)
    figures = summarize(timing, blocks * block_size)
    figures["worker_wall_s"] = round(time.perf_counter() - started)
    log(
        f"worker: per invocation CPU {figures['worker_invocation_cpu_ms']} ms through the worker vs "
        f"{figures['direct_invocation_cpu_ms']} ms direct (cost {figures['worker_cost_cpu_ms']} ms), wall "
        f"{figures['worker_invocation_wall_ms']} vs {figures['direct_invocation_wall_ms']} ms (cost "
        f"{figures['worker_cost_wall_ms']} ms); section took {figures['worker_wall_s']} s"
    )
    return figures


def summarize(timing: dict[str, Any], per_side: int) -> dict[str, Any]:
    """Medians over the blocks of each side's per-invocation figures; the worker's cost is their difference."""
    blocks = timing["blocks"]
    median = {key: statistics.median(values) for key, values in blocks.items()}
    return {
        "worker_invocation_cpu_ms": round(median["worker_cpu_ms"], 3),
        "direct_invocation_cpu_ms": round(median["direct_cpu_ms"], 3),
        "worker_cost_cpu_ms": round(median["worker_cpu_ms"] - median["direct_cpu_ms"], 3),
        "worker_invocation_wall_ms": round(median["worker_wall_ms"], 3),
        "direct_invocation_wall_ms": round(median["direct_wall_ms"], 3),
        "worker_cost_wall_ms": round(median["worker_wall_ms"] - median["direct_wall_ms"], 3),
        "worker_invocations": per_side,
        "worker_request_build_cpu_ms": round(timing["request_build_cpu_ms"], 3),
        "worker_blocks": {key: [round(value, 3) for value in values] for key, values in blocks.items()},
    }


# The subprocess: the worker and the direct calls, in alternating blocks ------------------------------------


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import gc
    import logging

    # Logging as in Azure (host.json: Information) for both sides, written nowhere: every record is still
    # created and formatted, the worker's own per-invocation line included.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=open(os.devnull, "w"),  # noqa: SIM115 - for the life of the process
    )
    from azure.functions.servicebus import ServiceBusMessage

    import sync_refresh_handler
    from localdev.local_host import LocalInvocationContext
    from shared import runtime
    from shared.events import CONTENT_TYPE
    from shared.expiring_check import refresh_requested_event
    from shared.times import utc_now
    from tests.support.functions_worker import FunctionsWorker, ServiceBusDelivery, worker_protos

    blocks, block_size, warmup = config["blocks"], config["block_size"], config["warmup"]
    worker = FunctionsWorker(APP_ROOT).start()
    errors = worker.load_all()
    if errors or FUNCTION not in worker.loaded:
        raise SystemExit(f"the worker did not load the app: {errors}")
    now = utc_now()
    store, settings = runtime.connection_store(), runtime.settings()
    pages = store.expiring_connection_pages(now + timedelta(hours=1), settings.skip_statuses)
    events = sorted((refresh_requested_event(c, now) for page in pages for c in page.connections), key=lambda e: e.id)
    needed = 2 * (warmup + blocks * block_size)
    if len(events) < needed:
        raise SystemExit(f"{len(events)} expiring connections, {needed} needed")
    unused = iter(events)  # each event once: no connection is refreshed twice

    def take(count: int) -> list[Any]:
        return [next(unused) for _ in range(count)]

    def through_worker(batch: list[Any]) -> None:
        deliveries = [ServiceBusDelivery.of_event(event) for event in batch]  # the messages as they arrive
        for delivery in deliveries:
            worker.invoke_service_bus(FUNCTION, delivery).raise_for_failure()

    def direct(batch: list[Any]) -> None:
        messages = [
            ServiceBusMessage(
                body=event.to_json(),
                message_id=event.id,
                delivery_count=1,
                content_type=CONTENT_TYPE,
                application_properties={"type": event.type},
                user_properties={},
            )
            for event in batch
        ]
        for message in messages:
            sync_refresh_handler.main(message, context=LocalInvocationContext(FUNCTION))

    def timed(run: Callable[[list[Any]], None], batch: list[Any]) -> tuple[float, float]:
        """(CPU ms, wall ms) per invocation; CPU is the whole process's, the worker's loop and pool threads too."""
        gc.collect()  # each block pays for its own garbage, not the previous block's
        wall, cpu = time.perf_counter(), time.process_time()
        run(batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return cpu * 1000 / len(batch), wall * 1000 / len(batch)

    through_worker(take(warmup))
    direct(take(warmup))
    sides = {"worker": through_worker, "direct": direct}
    figures: dict[str, list[float]] = {f"{side}_{unit}": [] for side in sides for unit in ("cpu_ms", "wall_ms")}
    for pair in range(blocks):
        # Paired blocks, each side first every other pair: drift (a filling Cosmos server, other load) cancels.
        for side in ("worker", "direct") if pair % 2 == 0 else ("direct", "worker"):
            cpu_ms, wall_ms = timed(sides[side], take(block_size))
            figures[f"{side}_cpu_ms"].append(cpu_ms)
            figures[f"{side}_wall_ms"].append(wall_ms)
    request_build_cpu_ms = request_build_cost(worker, worker_protos(), events[:block_size], ServiceBusDelivery)
    worker.stop()
    runtime.reset()
    return {"invocations": needed, "blocks": figures, "request_build_cpu_ms": request_build_cpu_ms}


def request_build_cost(worker: Any, protos: Any, events: list[Any], delivery_type: Any, repeats: int = 20) -> float:
    """CPU ms to build one InvocationRequest as FunctionsWorker.invoke_service_bus does. In Azure the host builds it
    (in .NET, another process) and the worker parses it off gRPC instead; it is in the worker side's figures here,
    so this says how much of the worker's cost it can be at most."""
    deliveries = [delivery_type.of_event(event) for event in events]
    function_id = worker.loaded[FUNCTION]
    cpu = time.process_time()
    for _ in range(repeats):
        for delivery in deliveries:
            protos.StreamingMessage(
                request_id=str(uuid.uuid4()),
                invocation_request=protos.InvocationRequest(
                    invocation_id=str(uuid.uuid4()),
                    function_id=function_id,
                    input_data=[protos.ParameterBinding(name="message", data=delivery.input_data())],
                    trigger_metadata=delivery.trigger_metadata(),
                    trace_context=protos.RpcTraceContext(
                        trace_parent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
                        trace_state="",
                        attributes={"OperationName": FUNCTION},
                    ),
                ),
            )
    return (time.process_time() - cpu) * 1000 / (repeats * len(deliveries))


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
