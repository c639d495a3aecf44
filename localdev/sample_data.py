"""Sample OAuth connections for the demo and the local run: `python -m localdev.sample_data` seeds them
into the Cosmos container named by the app's settings (local.settings.json / environment)."""

from __future__ import annotations

import sys
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

from urllib3.exceptions import InsecureRequestWarning

# The stand-in integration-manager answers 400 invalid_grant for these connections.
REJECTED_CONNECTIONS = frozenset({"conn-xero-4"})


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sample_connections(now: datetime) -> list[dict[str, Any]]:
    """Expiring (ISO and epoch ms, one already expired), not expiring, revoked, and one rejected."""

    def connection(conn_id: str, tenant: str, integration: str, status: str, expires_at: Any) -> dict[str, Any]:
        return {
            "id": conn_id,
            "tenantId": tenant,
            "integrationId": integration,
            "status": status,
            "oauth": {
                "accessToken": f"sample-access-{conn_id}",
                "refreshToken": f"sample-refresh-{conn_id}",
                "expiresAt": expires_at,
            },
        }

    return [
        connection("conn-salesforce-1", "acme", "salesforce", "active", iso(now + timedelta(minutes=10))),
        connection("conn-google-7", "acme", "google", "active", int((now + timedelta(minutes=30)).timestamp() * 1000)),
        connection("conn-hubspot-3", "globex", "hubspot", "active", iso(now - timedelta(hours=2))),
        connection("conn-slack-2", "globex", "slack", "active", iso(now + timedelta(days=3))),
        connection("conn-github-9", "initech", "github", "revoked", iso(now + timedelta(minutes=5))),
        connection("conn-xero-4", "initech", "xero", "active", iso(now + timedelta(minutes=20))),
    ]


def open_container(settings: Any) -> Any:
    """The connections container of `settings`, created (with partition key /tenantId) if missing."""
    from azure.cosmos import CosmosClient, PartitionKey

    warnings.filterwarnings("ignore", category=InsecureRequestWarning)  # local emulator only
    key = settings.cosmos_key.get_secret_value() if settings.cosmos_key else None
    if not settings.cosmos_endpoint or key is None:
        raise SystemExit("COSMOS_ENDPOINT and COSMOS_KEY must be set (local.settings.json or the environment)")
    return (
        CosmosClient(settings.cosmos_endpoint, credential=key)
        .create_database_if_not_exists(settings.cosmos_database)
        .create_container_if_not_exists(settings.cosmos_connections_container, partition_key=PartitionKey("/tenantId"))
    )


def main() -> int:
    from localdev.cli import load_local_settings
    from localdev.failures import report_failures
    from shared.settings import Settings, load_settings

    loaded: list[Settings] = []

    def seed() -> int:
        load_local_settings()
        loaded.append(load_settings())
        container = open_container(loaded[0])
        for document in sample_connections(datetime.now(UTC)):
            container.upsert_item(document)
            print(f"seeded {document['id']} ({document['integrationId']}, {document['status']})")
        return 0

    return report_failures(seed, lambda: loaded[0] if loaded else None, debug=False)


if __name__ == "__main__":
    sys.exit(main())
