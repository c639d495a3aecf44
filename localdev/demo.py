"""`make demo`: the whole pipeline once, on real local services, with a before/after table.

Starts RabbitMQ, the Cosmos-compatible server and Azurite on free loopback ports, seeds sample
connections, starts a stand-in integration-manager that "refreshes" by moving `oauth.expiresAt`
forward in Cosmos (and rejects one connection with invalid_grant), runs
`python -m localdev run --once` exactly as a developer would, prints what changed, and stops
everything it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

from azure.cosmos import CosmosClient, PartitionKey
from urllib3.exceptions import InsecureRequestWarning

from localdev.local_services import Azurite, CosmosServer, RabbitMQ
from localdev.sample_data import REJECTED_CONNECTIONS, iso, sample_connections
from localdev.stand_in_manager import Answer, StandInManager
from shared.times import parse_expires_at

APP_ROOT = Path(__file__).resolve().parent.parent
THRESHOLD_MS = 65 * 60 * 1000


def show(title: str, rows: list[dict], before: dict[str, object] | None = None) -> None:
    print(f"\n{title}")
    header = f"  {'connection':<20} {'integration':<11} {'status':<8} {'oauth.expiresAt':<26}"
    print(header + ("  change" if before is not None else ""))
    for row in sorted(rows, key=lambda r: r["id"]):
        expires_at = row["oauth"]["expiresAt"]
        shown = iso(parse_expires_at(expires_at)) if isinstance(expires_at, int | float) else expires_at
        line = f"  {row['id']:<20} {row['integrationId']:<11} {row['status']:<8} {shown:<26}"
        if before is not None:
            line += "  refreshed" if before[row["id"]] != expires_at else "  -"
        print(line)


def main() -> int:
    # The demo only talks to the loopback Cosmos emulator, whose certificate the SDK does not verify.
    warnings.filterwarnings("ignore", category=InsecureRequestWarning)
    base = Path(
        tempfile.mkdtemp(
            prefix="token-refresh-demo-", dir=APP_ROOT / ".local" if (APP_ROOT / ".local").is_dir() else None
        )
    )
    services = [RabbitMQ(base / "rabbitmq"), CosmosServer(base / "cosmos"), Azurite(base / "azurite")]
    manager = None
    try:
        print("Starting RabbitMQ, the Cosmos-compatible server and Azurite on free loopback ports ...")
        for service in services:
            service.start()
        rabbitmq, cosmos, azurite = services
        container = (
            CosmosClient(cosmos.endpoint, credential=cosmos.key)
            .create_database_if_not_exists("integrations")
            .create_container_if_not_exists("integration_connections", partition_key=PartitionKey(path="/tenantId"))
        )
        now = datetime.now(UTC)
        for document in sample_connections(now):
            container.upsert_item(document)
        before_rows = list(container.read_all_items())
        before = {row["id"]: row["oauth"]["expiresAt"] for row in before_rows}
        show(f"Before (threshold: tokens expiring by {iso(now + timedelta(milliseconds=THRESHOLD_MS))}):", before_rows)

        manager = StandInManager(
            script=lambda call: (
                Answer(400, {"error": "invalid_grant"}) if call.connection_id in REJECTED_CONNECTIONS else Answer()
            ),
            container=container,
        ).start()
        env = os.environ | {
            "TOKEN_REFRESH_ENABLED": "true",
            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": str(THRESHOLD_MS),
            "COSMOS_ENDPOINT": cosmos.endpoint,
            "COSMOS_KEY": cosmos.key,
            "COSMOS_EMULATOR": "true",
            "RABBITMQ_URL": rabbitmq.url,
            "INTEGRATION_MANAGER_URL": manager.url,
            "INTEGRATION_MANAGER_TOKEN": "demo-manager-token",
            "AzureWebJobsStorage": azurite.connection_string,
            # Blank = unset: the demo runs on RabbitMQ only, whatever local.settings.json says.
            "ServiceBusConnection": "",
            "ServiceBusConnection__fullyQualifiedNamespace": "",
        }
        print("\n$ python -m localdev run --once", flush=True)
        result = subprocess.run([sys.executable, "-m", "localdev", "run", "--once"], cwd=APP_ROOT, env=env, check=False)
        if result.returncode != 0:
            print(f"run --once failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
        show("After:", list(container.read_all_items()), before)
        print(
            f"\nintegration-manager received {len(manager.calls)} refresh call(s); "
            "revoked and not-yet-expiring connections were left alone."
        )
        return 0
    finally:
        if manager is not None:
            manager.stop()
        for service in reversed(services):
            service.stop()
        shutil.rmtree(base, ignore_errors=True)
        print("Stopped the local services.")


if __name__ == "__main__":
    from localdev.failures import report_failures

    sys.exit(report_failures(main, lambda: None, debug=False))
