"""Small helpers shared by the test modules."""

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from azure.functions.servicebus import ServiceBusMessage

from bench.soak_figures import most_in_any_window  # noqa: F401 - one definition: the soak judges limits so too
from localdev.local_host import LocalInvocationContext
from shared import telemetry
from shared.events import CheckExpiringData, CloudEvent, RefreshRequestedData, make_event
from shared.ids import refresh_request_id
from shared.times import format_time as iso
from shared.times import utc_now

MISSING = object()  # a field left out of a document or message
MANAGER_TOKEN = "manager-token-canary-0b7e1d"  # INTEGRATION_MANAGER_TOKEN of app_env (tests/conftest.py)


def trigger(
    event_or_body: CloudEvent | bytes, delivery_count: int = 1, message_id: str | None = None
) -> ServiceBusMessage:
    """The Service Bus trigger object the Functions host would pass for this event (or raw body)."""
    is_event = isinstance(event_or_body, CloudEvent)
    return ServiceBusMessage(
        body=event_or_body.to_json() if is_event else event_or_body,
        message_id=message_id or (event_or_body.id if is_event else "m-1"),
        delivery_count=delivery_count,
        application_properties={},
        user_properties={},
    )


def invoke(function_module: ModuleType, trigger_object: Any, **kwargs: Any) -> None:
    """Call a function folder's main() as the Functions host would: with the trigger object and an
    invocation `context` (a fresh invocation id). The real worker's own checks are in
    tests/integration/test_real_worker.py."""
    function_name = function_module.__name__.rsplit(".", 1)[-1]
    kwargs.setdefault("context", LocalInvocationContext(function_name))
    function_module.main(trigger_object, **kwargs)


APP_ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "localdev"]


def cli_environment(values: dict[str, str]) -> dict[str, str]:
    """The environment of a CLI subprocess: this process's, without the app's own settings, plus
    `values`. Service Bus is blanked (blank = unset), so a developer's local.settings.json cannot point
    a test at Service Bus."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_REFRESH", "COSMOS", "RABBITMQ"))}
    env.update({"ServiceBusConnection": "", "ServiceBusConnection__fullyQualifiedNamespace": ""})
    env.update(values)
    env["PYTHONPATH"] = str(APP_ROOT)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m localdev ARGS` to completion, output captured."""
    return subprocess.run(
        [*CLI, *args], cwd=APP_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def raw_event(event_type: str, data: Any, **changes: Any) -> dict:
    """A CloudEvent as JSON, built by hand (not by the app's models) so a test can break it:
    envelope fields in `changes` replace the valid ones, or are left out when MISSING."""
    body = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "integration-token-refresh",
        "type": event_type,
        "time": iso(utc_now()),
        "datacontenttype": "application/json",
        "data": data,
    }
    for name, value in changes.items():
        if value is MISSING:
            body.pop(name)
        else:
            body[name] = value
    return body


def refresh_request(connection_id: str, integration_id: str, tenant_id: str, expires_at: datetime) -> CloudEvent:
    """The refresh-requested event a check would publish for this connection and expiry (same id)."""
    data = RefreshRequestedData(
        connection_id=connection_id,
        integration_id=integration_id,
        tenant_id=tenant_id,
        expires_at=expires_at,
        requested_at=utc_now(),
    )
    return make_event(data, event_id=refresh_request_id(data, expires_at))


def check_event(threshold: timedelta = timedelta(hours=1)) -> CloudEvent:
    """A check-expiring event of now, for connections that expire within `threshold`."""
    now = utc_now()
    return make_event(CheckExpiringData(timestamp=now, threshold_time=now + threshold))


def numbered_refresh_request(n: int) -> CloudEvent:
    """Refresh request number `n` (connection conn-n, event id id-n), for tests that send many."""
    now = utc_now()
    data = RefreshRequestedData(
        connection_id=f"conn-{n}", integration_id="hubspot", tenant_id="t", expires_at=now, requested_at=now
    )
    return make_event(data, event_id=f"id-{n}")


def outputs(capsys: Any) -> tuple[str, str]:
    """What a command printed since the last call: (stdout, stderr)."""
    captured = capsys.readouterr()
    return captured.out, captured.err


def telemetry_fields() -> dict[str, str]:
    """The fields shared.telemetry attaches to the current invocation's log records (empty outside one)."""
    return dict(telemetry._fields.get())
