"""Write `local.settings.json` for the local services started by `localdev.local_services start`.

Starts from `local.settings.json.example`, fills in the local RabbitMQ, Cosmos and Azurite values,
points INTEGRATION_MANAGER_URL at the stand-in (`python -m localdev.stand_in_manager`, port 3000) and
leaves Service Bus unset. An existing local.settings.json keeps every value of the user's; only the
settings of the local services are rewritten (the services start on new free ports each time), and only
where they point at this machine or are unset: a setting that names another host (a real account) is left
as it is, and said so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import SettingsError

APP_ROOT = Path(__file__).resolve().parent.parent
STAND_IN_MANAGER_URL = "http://127.0.0.1:3000"
# The settings whose values come from the running local services (their ports change with every start).
SERVICE_SETTINGS = ("AzureWebJobsStorage", "COSMOS_ENDPOINT", "COSMOS_KEY", "RABBITMQ_URL")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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
        "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "4200000",
    }


def points_here(value: str) -> bool:
    """A value that is unset, the example's placeholder, or names a service on this machine: the local services'
    value may replace it. Anything else names another host: the user's, kept."""
    if not value.strip() or "<" in value or "UseDevelopmentStorage=true" in value:
        return True
    if ";" in value:  # a connection string (AzureWebJobsStorage): its endpoints
        return any(f"//{host}:" in value for host in LOOPBACK_HOSTS)
    try:
        return urlsplit(value).hostname in LOOPBACK_HOSTS
    except ValueError:
        return False


def update_service_settings(values: dict[str, str], local: dict[str, str]) -> tuple[list[str], list[str]]:
    """Put the local services' settings into `values` (a local.settings.json's Values) where they point here.
    Returns (the settings changed, the settings kept because they name another host). The Cosmos key follows its
    endpoint: the local server's key is only written with the local server's endpoint."""
    changed, kept, original = [], [], dict(values)
    for name in SERVICE_SETTINGS:
        deciding = "COSMOS_ENDPOINT" if name == "COSMOS_KEY" else name
        if not points_here(str(original.get(deciding, ""))):
            kept.append(name)
        elif original.get(name) != local[name]:
            values[name] = local[name]
            changed.append(name)
    if "COSMOS_ENDPOINT" in changed:
        values["COSMOS_EMULATOR"] = "true"  # the local server's self-signed certificate
    return changed, kept


def main(argv: list[str]) -> int:
    services_file = Path(argv[0]) if argv else APP_ROOT / ".local" / "services" / "services.json"
    services = json.loads(services_file.read_text())
    services = services.get("settings", services)
    values = local_values(services)
    target = APP_ROOT / "local.settings.json"
    if target.exists():
        try:
            document = json.loads(target.read_text(encoding="utf-8"))
            existing = document.setdefault("Values", {})
            changed, kept = update_service_settings(existing, values)
        except (ValueError, AttributeError) as error:
            raise SettingsError(
                f"{target} is not valid JSON with a Values object ({error}); fix or remove it"
            ) from None
        if changed:
            target.write_text(json.dumps(document, indent=2) + "\n")
            print(f"updated {', '.join(changed)} in {target} for the local services (every other value kept)")
        else:
            print(f"{target.name} already points at the local services")
        for name in kept:
            print(f"  kept {name}: it names another host, not this machine's local services")
        return 0
    document = json.loads((APP_ROOT / "local.settings.json.example").read_text())
    document["Values"].update(values)
    document["Values"].pop("ServiceBusConnection__fullyQualifiedNamespace", None)
    target.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {target} for the local services (git-ignored)")
    return 0


if __name__ == "__main__":
    from localdev.failures import report_failures

    sys.exit(report_failures(lambda: main(sys.argv[1:]), lambda: None, debug=False))
