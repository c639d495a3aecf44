"""Lean imports per function module: each loads only the SDKs it uses, on first use. The scale
behaviour against the real services: tests/integration/test_scale.py."""

import json
import os
import subprocess
import sys

from tests.support.helpers import APP_ROOT


def imported_modules(module: str, env: dict) -> set[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=APP_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def test_function_modules_import_only_what_they_need():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(APP_ROOT)}
    timer = imported_modules("check_expiring_timer", env)
    assert not {"azure.cosmos", "azure.servicebus", "azure.identity", "requests", "pika", "tenacity"} & timer
    check = imported_modules("manager_check_handler", env)
    assert not {"azure.cosmos", "azure.servicebus", "requests", "tenacity"} & check  # SDKs load on first use
    refresh = imported_modules("sync_refresh_handler", env)
    assert "azure.servicebus" not in refresh and "azure.cosmos" not in refresh
