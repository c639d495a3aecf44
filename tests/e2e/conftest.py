"""Fixtures of the end-to-end tests: the environment of the app run as a program, on the real local
services of app_env (tests/conftest.py)."""

import uuid

import pytest

from tests.support.helpers import cli_environment
from tests.support.host_process import TOKEN_LIFETIME


@pytest.fixture
def cli_env(app_env, manager):
    """The environment of a `python -m localdev ...` subprocess (the local host, the CLI's commands)."""
    return cli_environment(app_env)


@pytest.fixture
def fault_env(app_env, manager, cosmos_container):
    """The CLI's environment (real local services, fast retries) and a queue prefix of its own; the
    stand-in manager refreshes the connections in Cosmos as integration-manager would."""
    env = cli_environment(app_env | {"FAULT_QUEUE_PREFIX": f"fault-{uuid.uuid4().hex[:8]}."})
    manager.container = cosmos_container
    manager.token_lifetime = TOKEN_LIFETIME
    return env


@pytest.fixture
def operator_env(app_env, monkeypatch, tmp_path):
    """app_env for in-process `localdev.cli.main()`: no developer local.settings.json, no Service Bus."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("localdev.cli.APP_ROOT", tmp_path)
    monkeypatch.setenv("ServiceBusConnection", "")
    monkeypatch.setenv("ServiceBusConnection__fullyQualifiedNamespace", "")
    return app_env
