"""Every way an operator's command meets a broken service ends in one `error: …` line naming what failed (host:port,
the setting) and the fix, a non-zero exit code and no traceback: `python -m localdev` run as a program against the
real local services, each broken as a user would break it (docs/running-locally.md). What the line says for each
failure, and the summary of `run --once`, without services: tests/unit/test_failures.py."""

import socket
import subprocess
import time
import uuid

import pytest

from tests.support.documents import upsert_connection
from tests.support.helpers import APP_ROOT, CLI, MANAGER_TOKEN, run_cli
from tests.support.host_process import Host
from tests.support.network import closed_port

CHECK = ("check", "--dry-run")


def the_error_line(result) -> str:
    """The one line the command failed with: the last of stderr, the only `error:` line, and no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not errors[0].startswith("error: unexpected"), errors[0]  # a known failure, explained
    return errors[0]


def run_once(env: dict, *args: str):
    return run_cli(env, "run", "--once", "--queue-prefix", f"errors-{uuid.uuid4().hex[:8]}.", *args, timeout=60)


@pytest.mark.parametrize("command", ["check", "run --once"])
def test_cosmos_stopped_is_one_line_naming_its_address_and_setting(cli_env, command):
    port = closed_port()  # what a stopped server, or a stale port in local.settings.json, looks like to a client
    env = cli_env | {"COSMOS_ENDPOINT": f"https://127.0.0.1:{port}/"}
    result = run_cli(env, *CHECK) if command == "check" else run_once(env)
    assert result.returncode == 1
    line = the_error_line(result)
    assert f"127.0.0.1:{port}, COSMOS_ENDPOINT" in line and "connection refused" in line
    assert "make services-up" in line
    assert result.stdout == ""  # no table header or summary that reads as "nothing is due"


@pytest.mark.parametrize("command", ["check", "run --once"])
def test_a_key_that_is_not_a_key_is_one_line_naming_cosmos_key_and_never_the_value(cli_env, command):
    env = cli_env | {"COSMOS_KEY": "notakey-0d1f"}
    result = run_cli(env, *CHECK) if command == "check" else run_once(env)
    assert result.returncode == 1
    line = the_error_line(result)
    assert "COSMOS_KEY is not a Cosmos account key" in line
    assert "notakey-0d1f" not in result.stdout + result.stderr
    assert "Function manager_check_handler failed" not in result.stderr  # stopped before any message was consumed


@pytest.mark.parametrize(
    ("setting", "named"),
    [("COSMOS_CONNECTIONS_CONTAINER", "has no container 'typo_"), ("COSMOS_DATABASE", "has no database 'typo_")],
)
def test_a_typo_in_the_container_or_database_names_it_and_its_setting(cli_env, setting, named):
    result = run_cli(cli_env | {setting: f"typo_{uuid.uuid4().hex[:6]}"}, *CHECK)
    assert result.returncode == 1
    line = the_error_line(result)
    assert named in line and f", {setting}); fix {setting}" in line  # where (host:port, the setting), the fix


def test_a_delivery_limit_other_than_the_queues_is_one_line_with_the_value_to_use(cli_env):
    prefix = f"errors-{uuid.uuid4().hex[:8]}."
    first = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix)  # declares the queues (limit 3: app_env)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(cli_env, "run", "--once", "--queue-prefix", prefix, "--max-deliveries", "5")
    assert again.returncode == 1
    line = the_error_line(again)
    assert f"queue '{prefix}" in line and "x-delivery-limit 3, this run asks for 5" in line
    assert "--max-deliveries 3" in line


def test_manager_unreachable_ends_the_cycle_at_max_wait_naming_the_url_and_how_to_follow(
    cli_env, cosmos_container, manager
):
    upsert_connection(cosmos_container, "conn-due", expires_in_h=0.5)
    port = closed_port()
    env = cli_env | {
        "INTEGRATION_MANAGER_URL": f"http://127.0.0.1:{port}",
        "TOKEN_REFRESH_RETRY_DELAY_MS": "600000",  # the next try in 10 min: past the wait
    }
    result = run_once(env, "--max-wait", "3")
    assert result.returncode == 1
    line = the_error_line(result)
    assert "1 delivery(ies) still scheduled" in line
    assert "still scheduled: 1 delivery(ies)" in result.stdout and "`python -m localdev run`" in result.stdout
    [retry] = [entry for entry in result.stderr.splitlines() if "OAuth token refresh will be retried in" in entry]
    assert f"manager=http://127.0.0.1:{port} " in retry
    assert MANAGER_TOKEN not in result.stdout + result.stderr
    assert manager.calls == []


def test_the_stand_in_manager_on_a_port_in_use_is_one_line_naming_the_port(cli_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*CLI[:-1], "localdev.stand_in_manager", "--port", str(port)],
            cwd=APP_ROOT,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    line = the_error_line(result)
    assert f"port is in use (127.0.0.1:{port}, --port)" in line and "INTEGRATION_MANAGER_URL" in line


def test_run_keeps_running_through_cosmos_and_the_broker_being_down_as_it_starts_and_names_them(cli_env, tmp_path):
    # `run` stands in for the Functions host, which keeps running through an outage: a restart that meets one (the
    # soak's host_kill during a Cosmos blip or a broker restart) must not leave no host at all. Each attempt names
    # where; Ctrl-C still stops it cleanly. (`run --once` and `check` stop at once: the tests above.)
    cosmos_port, broker_port = closed_port(), closed_port()
    env = cli_env | {
        "COSMOS_ENDPOINT": f"https://127.0.0.1:{cosmos_port}/",
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{broker_port}/%2F",
        "FAULT_QUEUE_PREFIX": f"errors-{uuid.uuid4().hex[:8]}.",
    }
    host = Host(env, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while "RabbitMQ still unavailable" not in host.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        output = host.output()
        assert host.process.poll() is None, output[-3000:]
        assert f"(127.0.0.1:{cosmos_port}, COSMOS_ENDPOINT)" in output and "`run` goes on" in output, output[-3000:]
        assert f"RabbitMQ unavailable at 127.0.0.1:{broker_port}" in output, output[-3000:]
        assert "Traceback" not in output
        assert host.interrupt() == 0
    finally:
        host.kill()
