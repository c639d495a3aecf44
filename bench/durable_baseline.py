"""The refresh stage's same-guarantees baseline (issue #14), run by `make bench` in a process of its own.

A hand-written loop that does, per refresh-requested message, exactly the external work the app does
and nothing else, with the SDKs directly (no app code): consume with prefetch, re-read the connection,
create the claim, call the stand-in integration-manager, publish the outcome with a publisher confirm,
finish the claim, ack. `workers` threads, each with its own RabbitMQ connection (like the local host's
workers); one CosmosClient and one requests.Session for the process (like the app). It is what this
design costs on this machine with no code of ours in between.

The re-read is the app's single-partition query projecting status and expiry, not a point read: the app
never reads token values (shared/connection_store.py), and a baseline without that guarantee would not
be the same-guarantees one. bench/run.py measures separately what a point read would save.

Usage: python bench/durable_baseline.py < config.json (on stdin: it holds the Cosmos key); prints one JSON
line with the timings.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
import warnings
from datetime import UTC, datetime

import pika
import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.cosmos import CosmosClient
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning

warnings.filterwarnings("ignore", category=InsecureRequestWarning)  # the local Cosmos-compatible server

REREAD_QUERY = (
    "SELECT c.status, c.oauth.expiresAt AS expiresAt, c._ts FROM c WHERE c.id = @id AND c.tenantId = @tenantId"
)
PREFETCH = 1  # as the local host's workers (Azure: one message per concurrent call)
IDLE_S = 0.2  # a worker with nothing to consume for this long looks whether the run is over


def pooled(size: int) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def main(config: dict) -> dict:
    workers, count = config["workers"], config["count"]
    cosmos = CosmosClient(
        config["cosmos_endpoint"],
        credential=config["cosmos_key"],
        transport=RequestsTransport(session=pooled(32)),
        connection_verify=False,
    )
    database = cosmos.get_database_client(config["database"])
    connections = database.get_container_client(config["connections_container"])
    claims = database.get_container_client(config["state_container"])
    manager = pooled(32)
    done = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def refresh(channel: pika.adapters.blocking_connection.BlockingChannel, body: bytes) -> None:
        request = json.loads(body)
        data = request["data"]
        tenant, connection_id, integration = data["tenantId"], data["connectionId"], data["integrationId"]
        # The app's re-read: a single-partition query projecting what it needs, so token values never leave
        # Cosmos (a point read would return the whole document; bench/run.py measures what that would save).
        rows = list(
            connections.query_items(
                REREAD_QUERY,
                parameters=[{"name": "@id", "value": connection_id}, {"name": "@tenantId", "value": tenant}],
                partition_key=tenant,
            )
        )
        if not rows or rows[0].get("status") != "active":
            raise RuntimeError(f"{connection_id} is gone or not active")
        now_ms = int(time.time() * 1000)
        claim = claims.create_item(
            {
                "id": f"claim-{request['id']}",
                "kind": "claim",
                "connectionKey": f"{tenant}/{integration}/{connection_id}",
                "state": "in_progress",
                "leaseUntil": now_ms + 600_000,
                "attempts": 0,
                "updatedAt": now_ms,
            }
        )
        answer = manager.post(
            f"{config['manager_url']}/api/v1/integrations/{integration}/connections/{connection_id}/refresh",
            json={"tenantId": tenant},
            headers={"Idempotency-Key": request["id"], "X-Tenant-Id": tenant},
            timeout=10,
        )
        answer.raise_for_status()
        outcome = {
            "specversion": "1.0",
            "id": f"{request['id']}:refreshed",
            "source": "integration-token-refresh",
            "type": "integration.token.refreshed",
            "time": now_iso(),
            "datacontenttype": "application/json",
            "data": {
                "connectionId": connection_id,
                "integrationId": integration,
                "tenantId": tenant,
                "refreshedAt": now_iso(),
            },
        }
        channel.basic_publish(  # the channel is in confirm mode: returns once the broker confirmed
            config["exchange"],
            outcome["type"],
            json.dumps(outcome).encode(),
            pika.BasicProperties(
                content_type="application/cloudevents+json",
                message_id=outcome["id"],
                type=outcome["type"],
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
        )
        finished = {k: v for k, v in claim.items() if not k.startswith("_")}
        finished.update(state="refreshed", attempts=1, leaseUntil=0, outcome=outcome, published=True)
        claims.upsert_item(finished)

    def work() -> None:
        try:
            with pika.BlockingConnection(pika.URLParameters(config["rabbitmq_url"])) as connection:
                channel = connection.channel()
                channel.confirm_delivery()
                channel.basic_qos(prefetch_count=PREFETCH)
                for method, _properties, body in channel.consume(config["queue"], inactivity_timeout=IDLE_S):
                    if method is None:
                        with lock:
                            if done[0] >= count or errors:
                                break
                        continue
                    refresh(channel, body)
                    channel.basic_ack(method.delivery_tag)
                    with lock:
                        done[0] += 1
                channel.cancel()
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    started, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise errors[0]
    return {
        "refreshed": done[0],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "system_seconds": after.ru_stime - usage.ru_stime,  # of cpu_seconds: in the kernel (sockets, locks)
        "context_switches": after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.load(sys.stdin))))
