"""No secret ever leaves the app run as a program: settings errors, a refused broker password,
`check --dry-run` and `run --once`, the local host's logs and dead letters and the `dead-letters`
command, each with a canary in every secret (tests/support/canaries.py) and everything captured: CLI
stdout/stderr, log records at DEBUG, messages on the exchange, dead-letter headers. In process:
tests/integration/test_secrets.py."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pika
import pytest
from azure.functions.timer import TimerRequest

import check_expiring_timer
from localdev.local_host import LocalHost
from localdev.stand_in_manager import StandInManager
from shared import runtime
from shared.errors import SettingsError
from shared.events import REFRESH_REQUESTED
from shared.settings import load_settings
from tests.support.canaries import (
    BROKER_PASSWORD,
    BROKER_USER,
    COSMOS_KEY,
    FAILING,
    GOOD,
    MANAGER_TOKEN,
    ODD_COSMOS_KEY,
    ODD_MANAGER_TOKEN,
    SERVICE_BUS_CONNECTION,
    SERVICE_BUS_KEY,
    Exposure,
    echoing_manager,
    leak,
    odd_secrets_exposure,
    raw_messages,
    seed_secret_connections,
)
from tests.support.helpers import cli_environment, invoke, raw_event, run_cli

SECRET_IN_BAD_SETTINGS = [
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://svc:{MANAGER_TOKEN}@im.example.com"},
                 id="manager-url-credentials"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://im.example.com/api?token={MANAGER_TOKEN}"},
                 id="manager-url-query"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"https://im.example.com/#{MANAGER_TOKEN}"}, id="manager-url-fragment"),
    pytest.param({"INTEGRATION_MANAGER_URL": f"{MANAGER_TOKEN}"}, id="manager-token-pasted-as-url"),
    pytest.param({"RABBITMQ_URL": f"http://guest:{BROKER_PASSWORD}@127.0.0.1:5672/"}, id="rabbitmq-url-wrong-scheme"),
    pytest.param({"RABBITMQ_URL": f"amqp://guest:{BROKER_PASSWORD}@/"}, id="rabbitmq-url-without-host"),
    pytest.param({"RABBITMQ_URL": BROKER_PASSWORD}, id="rabbitmq-password-pasted-as-url"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION.replace("sb://", "https://")},
                 id="service-bus-not-sb"),
    pytest.param({"ServiceBusConnection": f"SharedAccessKeyName=send;SharedAccessKey={SERVICE_BUS_KEY}"},
                 id="service-bus-without-endpoint"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION,
                  "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net"},
                 id="service-bus-key-and-identity"),
    pytest.param({"ServiceBusConnection__fullyQualifiedNamespace": SERVICE_BUS_CONNECTION},
                 id="service-bus-string-as-namespace"),
    pytest.param({"COSMOS_KEY": COSMOS_KEY, "COSMOS_EMULATOR": "false"}, id="cosmos-key-loopback-without-emulator"),
    pytest.param({"COSMOS_KEY": COSMOS_KEY, "COSMOS_ENDPOINT": f"http://acct.documents.azure.com/{COSMOS_KEY}"},
                 id="cosmos-endpoint-not-https"),
    pytest.param({"TOKEN_REFRESH_INTERVAL_MS": MANAGER_TOKEN}, id="token-pasted-into-interval"),
    pytest.param({"TOKEN_REFRESH_ENABLED": BROKER_PASSWORD}, id="password-pasted-into-enabled"),
    pytest.param({"INTEGRATION_MANAGER_TIMEOUT_MS": SERVICE_BUS_KEY}, id="key-pasted-into-timeout"),
    pytest.param({"COSMOS_EMULATOR": COSMOS_KEY}, id="cosmos-key-pasted-into-emulator-flag"),
    # Accepted before, then quoted whole by requests' InvalidHeader in every delivery's error (issue 11).
    pytest.param({"INTEGRATION_MANAGER_TOKEN": f"{MANAGER_TOKEN[:20]}\n{MANAGER_TOKEN[20:]}"},
                 id="manager-token-with-a-line-break"),
    pytest.param({"COSMOS_KEY": f"{COSMOS_KEY[:10]} {COSMOS_KEY[10:]}"}, id="cosmos-key-with-a-space"),
    pytest.param({"RABBITMQ_URL": f"amqp://{BROKER_USER}:{BROKER_PASSWORD[:8]}\t{BROKER_PASSWORD[8:]}@127.0.0.1/"},
                 id="rabbitmq-password-with-a-tab"),
    pytest.param({"ServiceBusConnection": SERVICE_BUS_CONNECTION.replace("sb-", "sb-\x1b")},
                 id="service-bus-key-with-an-escape"),
]  # fmt: skip


def run_cli_verbose(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(env, "-v", *args, timeout=timeout)


@pytest.mark.parametrize("bad", SECRET_IN_BAD_SETTINGS)
def test_settings_errors_never_show_a_secret(bad, secret_env, monkeypatch, debug_logs):
    exposure = Exposure()
    environ = secret_env | bad
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    exposure.add_error("load_settings", raised.value)
    assert any(name in str(raised.value) for name in bad), str(raised.value)

    for name, value in bad.items():  # the same through a function, as the Functions host runs it
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as from_function:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    exposure.add_error("timer main", from_function.value)
    exposure.add_logs("timer main", debug_logs)

    result = run_cli_verbose(cli_environment(environ), "check", "--dry-run")  # and through the CLI
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: " in result.stderr
    exposure.add("CLI stdout", result.stdout)
    exposure.add("CLI stderr", result.stderr)
    exposure.assert_clean()


def test_a_refused_broker_password_is_never_shown(secret_env, monkeypatch, cosmos_container, debug_logs):
    exposure = Exposure()
    wrong = secret_env["RABBITMQ_URL"].replace(BROKER_PASSWORD, f"{BROKER_PASSWORD}-wrong")
    monkeypatch.setenv("RABBITMQ_URL", wrong)
    with pytest.raises(Exception, match="rabbitmq") as raised:
        invoke(check_expiring_timer, TimerRequest(past_due=False))
    exposure.add_error("timer with a refused password", raised.value)
    exposure.add_logs("timer", debug_logs)
    result = run_cli_verbose(cli_environment(secret_env | {"RABBITMQ_URL": wrong}), "run", "--once", timeout=60)
    assert result.returncode != 0
    exposure.add("CLI stdout", result.stdout)
    exposure.add("CLI stderr", result.stderr)
    exposure.assert_clean()


def test_cli_dry_run_and_run_once_never_print_a_secret(secret_env, cosmos_container, manager, event_tap):
    seed_secret_connections(cosmos_container)
    manager.container = cosmos_container  # a 2xx refreshes the document, as the real manager does
    with StandInManager() as elsewhere:
        manager.script = echoing_manager(elsewhere.url)
        env = cli_environment(secret_env)
        dry = run_cli_verbose(env, "check", "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        once = run_cli_verbose(env, "run", "--once", "--queue-prefix", f"secrets-cli-{uuid.uuid4().hex[:8]}.")
        assert once.returncode == 0, once.stderr[-3000:]
        assert elsewhere.sockets_accepted == 0
    assert f"{len(GOOD) + len(FAILING) + 1} connection(s) would be refreshed" in dry.stdout
    assert f"refreshed {len(GOOD)}, failed {len(FAILING) + 1}" in once.stdout
    assert {call.connection_id for call in manager.calls} == set(GOOD) | set(FAILING)
    exposure = Exposure()
    for name, result in (("check --dry-run", dry), ("run --once", once)):
        exposure.add(f"{name} stdout", result.stdout)
        exposure.add(f"{name} stderr", result.stderr)
    for captured_properties, body in raw_messages(event_tap.channel, event_tap.queue):
        exposure.add("exchange", captured_properties)
        exposure.add("exchange", body.decode("utf-8", "replace"))
    exposure.assert_clean()


LEAKY_FUNCTION = """
import json
import logging
from urllib.parse import quote, urlsplit

from shared import runtime


def main(message, context):
    settings = runtime.settings()
    secrets = [
        settings.integration_manager_token.get_secret_value(),
        settings.cosmos_key.get_secret_value(),
        urlsplit(settings.rabbitmq_url.get_secret_value()).password,
    ]
    forms = " | ".join(f"{s} {s!r} {quote(s, safe='')} {json.dumps(s)}" for s in secrets)
    try:
        raise ValueError(f"inner: {forms}")
    except ValueError:
        logging.getLogger("leaky.child").exception("raw, repr-escaped and URL-encoded: %s %r", forms, secrets)
    raise RuntimeError(f"failed with {forms} {secrets!r}")
"""


def leaky_app(root: Path) -> str:
    """A function app whose refresh-requested function logs and raises with every secret in every
    form; returns the function's name."""
    suffix = uuid.uuid4().hex[:8]
    timer, leaky = root / f"idle_timer_{suffix}", root / f"leaky_refresh_{suffix}"
    timer.mkdir()
    (timer / "function.json").write_text(
        json.dumps(
            {"bindings": [{"name": "timer", "type": "timerTrigger", "direction": "in", "schedule": "0 0 * * * *"}]}
        )
    )
    (timer / "__init__.py").write_text("def main(timer, context):\n    pass\n")
    leaky.mkdir()
    (leaky / "function.json").write_text(
        json.dumps({"bindings": [{"name": "message", "type": "serviceBusTrigger", "direction": "in",
                                  "queueName": REFRESH_REQUESTED, "connection": "ServiceBusConnection"}]})
    )  # fmt: skip
    (leaky / "__init__.py").write_text(LEAKY_FUNCTION)
    return leaky.name


def test_no_form_of_a_secret_survives_in_the_local_hosts_logs_dead_letters_or_the_dead_letters_command(
    secret_env, monkeypatch, rabbitmq, tmp_path, debug_logs
):
    """A function fails with every secret in its error, raw, repr-escaped and URL-encoded: the local host
    logs that error and dead-letters the message with it as the reason; an older dead letter carries the
    same forms. Nothing of them may reach the captured logs, the dead-letter headers read back from
    RabbitMQ, or `dead-letters` output."""
    monkeypatch.setenv("INTEGRATION_MANAGER_TOKEN", ODD_MANAGER_TOKEN)
    monkeypatch.setenv("COSMOS_KEY", ODD_COSMOS_KEY)
    monkeypatch.syspath_prepend(str(tmp_path))
    runtime.reset()
    function_name = leaky_app(tmp_path)
    prefix = f"secret-forms-{uuid.uuid4().hex[:8]}."
    host = LocalHost(load_settings(), queue_prefix=prefix, app_root=tmp_path)
    channel = host.connect()
    [function] = host.functions
    channel.confirm_delivery()
    channel.basic_publish(
        secret_env["RABBITMQ_EXCHANGE"],
        REFRESH_REQUESTED,
        json.dumps(raw_event(REFRESH_REQUESTED, {"connectionId": "c-1"})).encode(),
        pika.BasicProperties(message_id="leaky-1"),
    )
    summary = host.run_once()
    assert summary.dead_lettered == 1
    secrets = [ODD_MANAGER_TOKEN, ODD_COSMOS_KEY, BROKER_PASSWORD]
    channel.basic_publish(  # as an older host wrote it: the reason unscrubbed
        "",
        function.dead_letter_queue,
        b"{}",
        pika.BasicProperties(
            message_id="planted-1",
            headers={
                "x-dead-letter-reason": "MaxDeliveryCountExceeded",
                "x-dead-letter-error-description": leak(secrets),
            },
        ),
    )

    env = cli_environment(secret_env | {"INTEGRATION_MANAGER_TOKEN": ODD_MANAGER_TOKEN, "COSMOS_KEY": ODD_COSMOS_KEY})
    listed = run_cli(env, "dead-letters", "--transport", "rabbitmq", "--queue", "refresh-requested",
                     "--queue-prefix", prefix, timeout=60)  # fmt: skip
    dead_letters = raw_messages(channel, function.dead_letter_queue)
    host.close()

    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "leaky-1" in listed.stdout and "planted-1" in listed.stdout
    assert f"Function {function_name} failed on message leaky-1 (delivery 3 of 3)" in debug_logs.text
    assert "raw, repr-escaped and URL-encoded" in debug_logs.text
    exposure = odd_secrets_exposure()
    exposure.add_logs("local host", debug_logs)
    assert sorted(p.message_id for p, _ in dead_letters) == ["leaky-1", "planted-1"]
    for dead_properties, _ in dead_letters:
        if dead_properties.message_id == "leaky-1":
            assert "RuntimeError: failed with ***" in dead_properties.headers["x-dead-letter-error-description"]
            exposure.add("dead-letter headers", dead_properties.headers)
    exposure.add("dead-letters stdout", listed.stdout)
    exposure.add("dead-letters stderr", listed.stderr)
    exposure.assert_clean()
