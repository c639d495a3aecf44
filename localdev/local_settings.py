"""Write `local.settings.json` for the local services started by `localdev.local_services start`.

Starts from `local.settings.json.example`, fills in the local RabbitMQ, Cosmos and Azurite values,
points INTEGRATION_MANAGER_URL at the stand-in (`python -m localdev.stand_in_manager`, port 3000) and
leaves Service Bus unset. An existing local.settings.json is never overwritten: the values to put
into it are printed instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parent.parent
STAND_IN_MANAGER_URL = "http://127.0.0.1:3000"


def local_values(services: dict[str, str]) -> dict[str, str]:
    return {
        "AzureWebJobsStorage": services["AzureWebJobsStorage"],
        "COSMOS_ENDPOINT": services["COSMOS_ENDPOINT"],
        "COSMOS_KEY": services["COSMOS_KEY"],
        "COSMOS_EMULATOR": "true",
        "RABBITMQ_URL": services["RABBITMQ_URL"],
        "ServiceBusConnection": "",
        "INTEGRATION_MANAGER_URL": STAND_IN_MANAGER_URL,
        "INTEGRATION_MANAGER_TOKEN": "local-stand-in-token",
        "TOKEN_REFRESH_INTERVAL_MS": "60000",
        "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3900000",
    }


def main(argv: list[str]) -> int:
    services_file = Path(argv[0]) if argv else APP_ROOT / ".local" / "services" / "services.json"
    services = json.loads(services_file.read_text())
    services = services.get("settings", services)
    values = local_values(services)
    target = APP_ROOT / "local.settings.json"
    if target.exists():
        print(f"{target.name} exists, left as it is; for the local services set:")
        for name, value in values.items():
            print(f"  {name}={value}")
        return 0
    document = json.loads((APP_ROOT / "local.settings.json.example").read_text())
    document["Values"].update(values)
    document["Values"].pop("ServiceBusConnection__fullyQualifiedNamespace", None)
    target.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {target} for the local services (git-ignored)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
