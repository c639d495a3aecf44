"""What the operator reads when a local command fails (localdev/failures.py), without services: the SDKs' own
exception types as they raise them, each turned into one line naming what failed, where (host:port, the setting)
and the fix; the exit codes; `--debug`; no secret in any of it. Also `make services-up`'s rewrite of an existing
local.settings.json, the summary of `run --once` and integration-manager's URL in log lines. The same failures
from real commands on real services: tests/e2e/test_operator_errors.py."""

import binascii
import json

import pika
import pytest
from azure.core.exceptions import ServiceRequestError
from azure.cosmos.exceptions import CosmosResourceNotFoundError
from azure.servicebus import exceptions as service_bus

from localdev import cli, local_settings
from localdev.failures import explain, report_failures
from localdev.local_host import CycleSummary, InvocationFailure
from shared import runtime
from shared.errors import SettingsError
from shared.manager_client import manager_location
from shared.settings import load_settings
from tests.support.network import closed_port

COSMOS_KEY = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="  # base64, as a real key
BROKER_PASSWORD = "broker-pw-7c1e"


@pytest.fixture
def settings(monkeypatch):
    for name, value in {
        "COSMOS_ENDPOINT": "https://127.0.0.1:8081/",
        "COSMOS_KEY": COSMOS_KEY,
        "COSMOS_EMULATOR": "true",
        "COSMOS_DATABASE": "integrations",
        "COSMOS_CONNECTIONS_CONTAINER": "integration_connections",
        "RABBITMQ_URL": f"amqp://user:{BROKER_PASSWORD}@127.0.0.1:5673/%2F",
    }.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def raised_from(cause: BaseException) -> BaseException:
    """`cause` as the command sees it: raised while handling it, as the SDKs and the app's steps wrap errors."""
    try:
        try:
            raise cause
        except BaseException as error:
            raise RuntimeError("while reading the connections") from error
    except RuntimeError as wrapped:
        return wrapped


def test_a_key_that_is_not_base64_names_cosmos_key_and_its_address(settings):
    line = str(explain(raised_from(binascii.Error("Incorrect padding")), settings))
    assert line.startswith("COSMOS_KEY is not a Cosmos account key")
    assert "(127.0.0.1:8081, COSMOS_KEY)" in line


def test_cosmos_refusing_connections_names_host_port_the_setting_and_the_fix(settings):
    refused = ServiceRequestError(
        "<urllib3.connection.HTTPSConnection object>: Failed to establish a new connection: [Errno 111] "
        "Connection refused"
    )
    line = str(explain(refused, settings))
    assert "Cosmos DB cannot be reached: connection refused" in line
    assert "(127.0.0.1:8081, COSMOS_ENDPOINT)" in line
    assert "make services-up" in line and "rewrites the ports" in line  # the stale-port case


def test_a_missing_cosmos_resource_names_the_settings_to_check(settings):
    line = str(explain(CosmosResourceNotFoundError(status_code=404, message="not found"), settings))
    assert "'integrations'" in line and "'integration_connections'" in line
    assert "COSMOS_DATABASE, COSMOS_CONNECTIONS_CONTAINER" in line


@pytest.mark.parametrize(
    "reply",
    [  # RabbitMQ 3.10's text, and the older one
        "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'itr.check-expiring' in vhost '/': "
        "received '3' but current is '10'",
        "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'itr.check-expiring' in vhost '/': "
        "received the value '3' of type 'signedint' but current is the value '10' of type 'long'",
    ],
)
def test_a_queue_declared_with_another_delivery_limit_says_which_queue_and_the_value_to_pass(settings, reply):
    line = str(explain(pika.exceptions.ChannelClosedByBroker(406, reply), settings))
    assert line.startswith("RabbitMQ queue 'itr.check-expiring' was declared with x-delivery-limit 10")
    assert "this run asks for 3" in line and "--max-deliveries 10" in line and "--queue-prefix" in line
    assert "(127.0.0.1:5673, RABBITMQ_URL)" in line


def test_an_unreachable_broker_names_host_port_never_the_url_or_its_password(settings):
    line = str(explain(pika.exceptions.AMQPConnectionError("Connection refused"), settings))
    assert "(127.0.0.1:5673, RABBITMQ_URL)" in line and "make services-up" in line
    assert BROKER_PASSWORD not in line and "amqp://" not in line


def test_an_unknown_failure_is_not_explained(settings):
    assert explain(KeyError("x"), settings) is None


def fails_with(error: BaseException):
    def command() -> int:
        raise error

    return command


def test_a_known_failure_is_one_line_and_exit_1(settings, capsys):
    assert report_failures(fails_with(raised_from(binascii.Error("Incorrect padding"))), lambda: settings, debug=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: COSMOS_KEY is not a Cosmos account key")


def test_an_unknown_failure_is_one_scrubbed_line_pointing_at_debug(settings, capsys):
    code = report_failures(fails_with(ValueError(f"boom with {COSMOS_KEY}")), lambda: settings, debug=False)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected ValueError: boom with ***")
    assert "--debug" in err and COSMOS_KEY not in err


def test_debug_shows_the_traceback_scrubbed_then_the_line(settings, capsys):
    code = report_failures(fails_with(ValueError(f"boom with {COSMOS_KEY}")), lambda: settings, debug=True)
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith("error: unexpected ValueError")
    assert COSMOS_KEY not in err


def test_a_settings_error_exits_2(capsys):
    assert report_failures(fails_with(SettingsError("COSMOS_ENDPOINT is not set")), lambda: None, debug=False) == 2
    assert capsys.readouterr().err == "error: COSMOS_ENDPOINT is not set\n"


def test_dead_letters_with_the_broker_down_names_its_address(settings, tmp_path, monkeypatch, capsys):
    port = closed_port()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("localdev.cli.APP_ROOT", tmp_path)
    monkeypatch.setenv("RABBITMQ_URL", f"amqp://user:{BROKER_PASSWORD}@127.0.0.1:{port}/%2F")
    for name in ("ServiceBusConnection", "ServiceBusConnection__fullyQualifiedNamespace"):
        monkeypatch.setenv(name, "")
    runtime.reset()
    assert cli.main(["dead-letters"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: RabbitMQ cannot be used: AMQPConnectionError (127.0.0.1:{port}, RABBITMQ_URL)")
    assert err.count("\n") == 1 and BROKER_PASSWORD not in err
    runtime.reset()


def test_without_local_settings_json_the_error_names_the_file_and_make_services_up(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("localdev.cli.APP_ROOT", tmp_path)
    monkeypatch.delenv("COSMOS_ENDPOINT", raising=False)
    runtime.reset()
    assert cli.main(["check", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "COSMOS_ENDPOINT is not set" in err
    assert f"no local.settings.json in {tmp_path}" in err and "`make services-up` writes one" in err
    runtime.reset()


# make services-up: an existing local.settings.json ------------------------------------------------------------


SERVICES = {
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:40001/%2F",
    "COSMOS_ENDPOINT": "https://127.0.0.1:40002/",
    "COSMOS_KEY": "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU9DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==",
    "AzureWebJobsStorage": "DefaultEndpointsProtocol=http;BlobEndpoint=http://127.0.0.1:40003/devstoreaccount1;",
}


def services_up(tmp_path, monkeypatch, values: dict[str, str]) -> dict[str, str]:
    """local_settings.main as `make services-up` runs it, over a local.settings.json holding `values`."""
    monkeypatch.setattr(local_settings, "APP_ROOT", tmp_path)
    (tmp_path / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    (tmp_path / "services.json").write_text(json.dumps({"settings": SERVICES}))
    assert local_settings.main([str(tmp_path / "services.json")]) == 0
    return json.loads((tmp_path / "local.settings.json").read_text())["Values"]


def test_services_up_rewrites_the_old_ports_and_keeps_every_other_value(tmp_path, monkeypatch):
    old = {
        "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:31651/%2F",
        "COSMOS_ENDPOINT": "https://127.0.0.1:19926/",
        "COSMOS_KEY": SERVICES["COSMOS_KEY"],
        "AzureWebJobsStorage": "DefaultEndpointsProtocol=http;BlobEndpoint=http://127.0.0.1:31239/devstoreaccount1;",
        "TOKEN_REFRESH_RATE_LIMITS": "salesforce=2/s",
        "INTEGRATION_MANAGER_URL": "http://127.0.0.1:3977",
    }
    values = services_up(tmp_path, monkeypatch, old)
    assert {name: values[name] for name in SERVICES} == SERVICES
    assert values["TOKEN_REFRESH_RATE_LIMITS"] == "salesforce=2/s"  # the user's own
    assert values["INTEGRATION_MANAGER_URL"] == "http://127.0.0.1:3977"


def test_services_up_keeps_a_cosmos_account_elsewhere_and_its_key(tmp_path, monkeypatch, capsys):
    remote = {"COSMOS_ENDPOINT": "https://prod.documents.azure.com:443/", "COSMOS_KEY": COSMOS_KEY}
    values = services_up(tmp_path, monkeypatch, remote | {"RABBITMQ_URL": "amqp://guest:guest@localhost:5672/%2F"})
    assert values["COSMOS_ENDPOINT"] == remote["COSMOS_ENDPOINT"] and values["COSMOS_KEY"] == COSMOS_KEY
    assert values["RABBITMQ_URL"] == SERVICES["RABBITMQ_URL"]
    out = capsys.readouterr().out
    assert "kept COSMOS_ENDPOINT" in out and "kept COSMOS_KEY" in out


# run --once's summary -----------------------------------------------------------------------------------------


def test_the_summary_says_what_went_wrong_with_the_cycle(capsys):
    clean = CycleSummary(found=4, refreshed=3, failed=1)  # a refresh that failed is an outcome, not a problem
    assert clean.problems == []
    poison = InvocationFailure("sync_refresh_handler", "poison-1", "InvalidEventError: not a CloudEvent", True)
    summary = CycleSummary(
        dead_lettered=1,
        dead_letters=[poison],
        check_failures=[InvocationFailure("manager_check_handler", "c-1", "Error: Incorrect padding", False)],
        still_scheduled=4,
    )
    assert summary.problems == ["the check failed", "1 message(s) dead-lettered", "4 delivery(ies) still scheduled"]
    cli._print_summary(summary, max_wait=120)
    out = capsys.readouterr().out
    assert "check failed: manager_check_handler on every delivery (1): Error: Incorrect padding" in out
    assert "dead-lettered: sync_refresh_handler message poison-1: InvalidEventError" in out
    assert "`python -m localdev dead-letters`" in out
    assert "still scheduled: 4 delivery(ies)" in out and "--max-wait 120 s" in out and "`python -m localdev run`" in out


def test_integration_managers_url_in_a_log_line_has_no_user_password_or_query():
    assert manager_location("https://svc:pw-9@manager.internal:8443/base/?token=t-1") == (
        "https://manager.internal:8443/base"
    )
    assert manager_location(None) == "-"


SERVICE_BUS_KEY = "c2VjcmV0LXNlcnZpY2UtYnVzLWtleQ=="


@pytest.mark.parametrize(
    ("error", "what", "fix"),
    [
        (service_bus.ServiceBusAuthenticationError(message="Unauthorized"), "refused the credentials", "Data Receiver"),
        (service_bus.ServiceBusAuthorizationError(message="Forbidden"), "refused the credentials", "Data Receiver"),
        (service_bus.MessagingEntityNotFoundError(message="no queue x"), "has no such queue", "make deploy"),
        (service_bus.ServiceBusConnectionError(message="refused"), "cannot be reached", "port 5671"),
    ],
    ids=["authentication", "authorization", "no-queue", "unreachable"],
)
def test_a_service_bus_failure_names_the_namespace_and_the_fix_never_the_key(settings, monkeypatch, error, what, fix):
    monkeypatch.setenv(
        "ServiceBusConnection",
        f"Endpoint=sb://ns-ops.servicebus.windows.net/;SharedAccessKeyName=ops;SharedAccessKey={SERVICE_BUS_KEY}",
    )
    line = str(explain(raised_from(error), load_settings()))
    assert f"Azure Service Bus {what}" in line and fix in line
    assert "(ns-ops.servicebus.windows.net:5671, ServiceBusConnection)" in line
    assert SERVICE_BUS_KEY not in line


def test_a_service_bus_failure_with_an_identity_names_the_namespace_setting(settings, monkeypatch):
    monkeypatch.setenv("ServiceBusConnection__fullyQualifiedNamespace", "ns-ops.servicebus.windows.net")
    line = str(explain(service_bus.ServiceBusConnectionError(message="refused"), load_settings()))
    assert "(ns-ops.servicebus.windows.net, ServiceBusConnection__fullyQualifiedNamespace)" in line
