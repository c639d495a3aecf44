"""scripts/deploy.sh: what it would create, and every az command it prints, checked by the real Azure CLI.

`--dry-run` prints each `az` command exactly as the script would run it. The tests read those lines
for the resources and settings the design needs (queue options, identity-based connections, no keys,
Key Vault references), and then run every line through the real Azure CLI (PyPI `azure-cli` in
`.venv-azcli`, installed by scripts/install-azure-cli.sh) with an empty config dir and no login: the
CLI parses and validates the command, then stops at "Please run 'az login'". Any other outcome (an
unknown option, a misspelled command, a bad value) fails the test.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "deploy.sh"
AZCLI_VENV = Path(os.environ.get("AZCLI_VENV", REPO / ".venv-azcli"))
AZ = AZCLI_VENV / "bin" / "az"
QUEUE_FILE = REPO / "localdev" / "service_bus_queues.json"
REFRESH_QUEUE = "integration.token.refresh-requested"
# The queues the app sends to and no function of it reads: deploy.sh gives them a TTL and a size.
OUTCOME_QUEUES = (
    "integration.token.refreshed",
    "integration.token.refresh.failed",
    "integration.token.refresh.systemic-failure",
)
OUTCOME_DEFAULTS = {"defaultMessageTimeToLive": "P1D", "--max-size": "5120"}

REQUIRED = {
    "RESOURCE_GROUP": "rg-token-refresh",
    "LOCATION": "westeurope",
    "APP_NAME": "token-refresh-test",
    "COSMOS_ACCOUNT": "platform-cosmos",
}
RABBITMQ_SECRET = "amqps://svc:rabbit-canary-8d2f@mq.example.com/prod"
MANAGER_SECRET = "manager-token-canary-51c7"
FULL = {
    **REQUIRED,
    "INTEGRATION_MANAGER_URL": "https://integration-manager.example.com",
    "RABBITMQ_URL": RABBITMQ_SECRET,
    "INTEGRATION_MANAGER_TOKEN": MANAGER_SECRET,
    "ALERT_EMAIL": "ops@example.com",
    "TOKEN_REFRESH_MAX_DELIVERY_COUNT": "7",
    "DUPLICATE_DETECTION_WINDOW": "P1DT12H",
    "TOKEN_REFRESH_PAGE_SIZE": "100",
    "TOKEN_REFRESH_RATE_LIMITS": "salesforce=5/s,*=50/s",
}
KEY_MARKERS = ("AccountKey=", "SharedAccessKey=", "SharedAccessKeyName=", "COSMOS_KEY=")
LOGIN_REQUIRED = "Please run 'az login'"


def run_deploy(env: dict[str, str], *args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    # Only what is given: a developer's own RESOURCE_GROUP etc. must not leak into the test.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()), **env}
    return subprocess.run(
        ["bash", str(script), *args], env=clean, capture_output=True, text=True, timeout=60, check=False
    )


def az_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("az ")]


def option(argv: list[str], name: str) -> str:
    """The value after option `name` (exactly one occurrence)."""
    positions = [i for i, token in enumerate(argv) if token == name]
    assert len(positions) == 1, f"{name} should appear once in {shlex.join(argv)}"
    return argv[positions[0] + 1]


def option_values(argv: list[str], name: str) -> list[str]:
    """Every value after option `name`, up to the next option."""
    start = argv.index(name) + 1
    values = []
    for token in argv[start:]:
        if token.startswith("--"):
            break
        values.append(token)
    return values


def commands(lines: list[list[str]], *words: str) -> list[list[str]]:
    return [argv for argv in lines if argv[1 : 1 + len(words)] == list(words)]


def queue_command(lines: list[list[str]], queue: str) -> list[str]:
    found = [argv for argv in commands(lines, "servicebus", "queue", "create") if option(argv, "--name") == queue]
    assert len(found) == 1, f"queue {queue} should be created once"
    return found[0]


def queue_options(argv: list[str]) -> dict[str, str]:
    """The queue's own options of a `servicebus queue create` (each given once, each with one value)."""
    tokens = argv[4:]
    options: dict[str, str] = {}
    for i in range(0, len(tokens), 2):
        name, value = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        assert name.startswith("--") and value is not None and not value.startswith("--"), shlex.join(argv)
        assert name not in options, f"{name} twice in {shlex.join(argv)}"
        options[name] = value
    for name in ("--resource-group", "--namespace-name", "--name", "--output"):
        del options[name]
    return options


def file_queues() -> dict[str, dict]:
    return json.loads(QUEUE_FILE.read_text("utf-8"))["queues"]


def expected_queue_options(properties: dict) -> dict[str, str]:
    """The az options the deployment must give a queue with these properties of the queue file."""
    plain = {
        "maxDeliveryCount": "--max-delivery-count",
        "lockDuration": "--lock-duration",
        "defaultMessageTimeToLive": "--default-message-time-to-live",
        "deadLetteringOnMessageExpiration": "--enable-dead-lettering-on-message-expiration",
    }
    options = {}
    for key, value in properties.items():
        if key == "requiresSession":
            if value:
                options["--enable-session"] = "true"
        elif key == "requiresDuplicateDetection":
            if value:
                options["--duplicate-detection"] = "true"
                if "duplicateDetectionHistoryTimeWindow" in properties:  # else the service's default
                    window = properties["duplicateDetectionHistoryTimeWindow"]
                    options["--duplicate-detection-history-time-window"] = window
        elif key.startswith("--"):  # an option deploy.sh adds that the queue file has no key for
            options[key] = str(value)
        elif key != "duplicateDetectionHistoryTimeWindow":
            # A property the test does not know fails here: map it in deploy.sh and here.
            options[plain[key]] = json.dumps(value) if isinstance(value, bool) else str(value)
    return options


def app_settings(lines: list[list[str]]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for argv in commands(lines, "functionapp", "config", "appsettings", "set"):
        for pair in option_values(argv, "--settings"):
            name, _, value = pair.partition("=")
            settings[name] = value
    return settings


@pytest.fixture(scope="module")
def full_run() -> subprocess.CompletedProcess[str]:
    result = run_deploy(FULL, "--dry-run")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def minimal_run() -> subprocess.CompletedProcess[str]:
    result = run_deploy(REQUIRED, "--dry-run")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def full(full_run) -> list[list[str]]:
    return az_lines(full_run.stdout)


@pytest.fixture(scope="module")
def minimal(minimal_run) -> list[list[str]]:
    return az_lines(minimal_run.stdout)


# --- usage ----------------------------------------------------------------------------------------


def test_help_prints_usage():
    result = run_deploy({}, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:")
    for name in (*REQUIRED, "--dry-run", "TOKEN_REFRESH_INTERVAL_MS", "ALERT_EMAIL", "ACTION_GROUP", "RABBITMQ_URL",
                 "OUTCOME_QUEUE_TTL", "MAXIMUM_INSTANCE_COUNT", "RETRYABLE_FAILURE_ALERT_PERCENT"):  # fmt: skip
        assert name in result.stdout


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_missing_required_setting_exits_2_with_usage(missing):
    env = {name: value for name, value in REQUIRED.items() if name != missing}
    result = run_deploy(env, "--dry-run")
    assert result.returncode == 2
    assert f"missing required environment variable(s): {missing}" in result.stderr
    assert "Usage:" in result.stderr
    assert result.stdout == ""


def test_unknown_argument_exits_2():
    assert run_deploy(REQUIRED, "--dry-run", "--yes").returncode == 2


# --- what the dry run shows -----------------------------------------------------------------------


def test_dry_run_prints_only_az_commands_and_comments(full_run, full):
    lines = [line for line in full_run.stdout.splitlines() if line.strip()]
    assert all(line.startswith(("az ", "# ")) for line in lines), [
        line for line in lines if not line.startswith(("az ", "# "))
    ]
    assert len(full) >= 35
    assert all(argv[0] == "az" for argv in full)
    # The zip is built by the script itself: shown as a comment, not as a command.
    assert any(line.startswith("# build ") and "allowlist" in line for line in lines)


def test_service_bus_namespace_and_queues(full):
    (namespace,) = commands(full, "servicebus", "namespace", "create")
    assert option(namespace, "--sku") == "Standard"
    assert option(namespace, "--disable-local-auth") == "true"

    refresh = queue_command(full, REFRESH_QUEUE)
    assert option(refresh, "--duplicate-detection") == "true"
    assert option(refresh, "--duplicate-detection-history-time-window") == FULL["DUPLICATE_DETECTION_WINDOW"]
    assert option(refresh, "--max-delivery-count") == FULL["TOKEN_REFRESH_MAX_DELIVERY_COUNT"]
    assert option(refresh, "--lock-duration") == "PT5M"
    assert option(refresh, "--enable-dead-lettering-on-message-expiration") == "true"
    queue_command(full, "integration.token.check-expiring")
    queue_command(full, "integration.token.refreshed")
    queue_command(full, "integration.token.refresh.failed")


def test_no_queue_uses_sessions(full, minimal):
    # One message per session made the Functions session processor hold a slot per refresh for the call plus
    # sessionIdleTimeout; the etag-guarded claim in Cosmos already keeps two calls for one request apart.
    assert file_queues()[REFRESH_QUEUE]["requiresSession"] is False
    for argv in full + minimal:
        assert "--enable-session" not in argv, shlex.join(argv)


@pytest.mark.parametrize("run", ["minimal", "full"])
def test_every_queue_of_the_queue_file_is_created_with_exactly_its_properties(run, request):
    """localdev/service_bus_queues.json is the one source (the Service Bus model reads it too): a queue or a
    property that deploy.sh does not apply as the file says fails here."""
    lines, env = request.getfixturevalue(run), FULL if run == "full" else REQUIRED
    created = [option(argv, "--name") for argv in commands(lines, "servicebus", "queue", "create")]
    assert sorted(created) == sorted(file_queues())
    for queue, properties in file_queues().items():
        expected = dict(properties)
        if queue == REFRESH_QUEUE:  # the overrides: the app setting's value, and the window when set
            expected["maxDeliveryCount"] = int(env.get("TOKEN_REFRESH_MAX_DELIVERY_COUNT", "10"))
            if "DUPLICATE_DETECTION_WINDOW" in env:
                expected["duplicateDetectionHistoryTimeWindow"] = env["DUPLICATE_DETECTION_WINDOW"]
        if queue in OUTCOME_QUEUES:  # the file's TTL when it has one, else the default; the size
            expected = {**OUTCOME_DEFAULTS, **expected}
        assert queue_options(queue_command(lines, queue)) == expected_queue_options(expected), queue
    # Without DUPLICATE_DETECTION_WINDOW the file's window applies.
    if run == "minimal":
        window = file_queues()[REFRESH_QUEUE]["duplicateDetectionHistoryTimeWindow"]
        assert option(queue_command(lines, REFRESH_QUEUE), "--duplicate-detection-history-time-window") == window


@pytest.mark.parametrize("window", ["banana", "PT5S", "PT19S", "P8D", "P7DT1S", "PT", "P", "2h", "PT2H ", "P1W"])
def test_duplicate_detection_window_outside_service_bus_limits_exits_2(window):
    result = run_deploy({**REQUIRED, "DUPLICATE_DETECTION_WINDOW": window}, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert len(errors) == 1, result.stderr
    assert "DUPLICATE_DETECTION_WINDOW" in errors[0]
    assert "ISO 8601" in errors[0] and "PT20S" in errors[0] and "P7D" in errors[0]


@pytest.mark.parametrize("window", ["PT20S", "P7D", "PT10M", "PT36H"])
def test_duplicate_detection_window_within_limits_is_applied(window):
    result = run_deploy({**REQUIRED, "DUPLICATE_DETECTION_WINDOW": window}, "--dry-run")
    assert result.returncode == 0, result.stderr
    refresh = queue_command(az_lines(result.stdout), REFRESH_QUEUE)
    assert option(refresh, "--duplicate-detection-history-time-window") == window


def script_with_queue_file(root: Path, queues: dict) -> Path:
    """A copy of deploy.sh (and host.json) next to its own localdev/service_bus_queues.json."""
    (root / "scripts").mkdir(parents=True)
    (root / "localdev").mkdir()
    shutil.copy2(SCRIPT, root / "scripts" / "deploy.sh")
    shutil.copy2(REPO / "host.json", root / "host.json")
    (root / "localdev" / "service_bus_queues.json").write_text(json.dumps({"queues": queues}))
    return root / "scripts" / "deploy.sh"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"maxSizeInMegabytes": 1024}, "unknown properties maxSizeInMegabytes"),
        ({"requiresSession": "false"}, "requiresSession must be true or false"),
        ({"lockDuration": "5 minutes"}, "lockDuration must be an ISO 8601 duration"),
        (
            {"requiresDuplicateDetection": True, "duplicateDetectionHistoryTimeWindow": "PT10S"},
            "duplicateDetectionHistoryTimeWindow is out of range",
        ),
        ({"duplicateDetectionHistoryTimeWindow": "PT2H"}, "without requiresDuplicateDetection"),
        ({"maxMessageSizeInKilobytes": 1024}, "Premium"),
    ],
)
def test_a_bad_queue_file_stops_before_any_command(tmp_path, change, message):
    queues = file_queues()
    queue = "integration.token.check-expiring"
    queues[queue] = {key: value for key, value in {**queues[queue], **change}.items() if value is not None}
    result = run_deploy(REQUIRED, "--dry-run", script=script_with_queue_file(tmp_path, queues))
    assert result.returncode == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert len(errors) == 1, result.stderr
    assert "service_bus_queues.json" in errors[0] and queue in errors[0] and message in errors[0]


def test_every_property_the_service_bus_model_reads_is_applied(tmp_path):
    """The other values a queue file may hold (the Service Bus model reads them too), through the same mapping."""
    queues = file_queues()
    queues["integration.token.check-expiring"] = {
        "requiresSession": True,
        "requiresDuplicateDetection": True,  # no window: Service Bus's default, as in the model
        "defaultMessageTimeToLive": "P1D",
        "deadLetteringOnMessageExpiration": False,
    }
    result = run_deploy(REQUIRED, "--dry-run", script=script_with_queue_file(tmp_path, queues))
    assert result.returncode == 0, result.stderr
    lines = az_lines(result.stdout)
    for queue, properties in queues.items():
        expected = {**properties, "maxDeliveryCount": 10} if queue == REFRESH_QUEUE else properties
        expected = {**OUTCOME_DEFAULTS, **expected} if queue in OUTCOME_QUEUES else expected
        assert queue_options(queue_command(lines, queue)) == expected_queue_options(expected), queue
    assert queue_options(queue_command(lines, "integration.token.check-expiring")) == {
        "--enable-session": "true",
        "--duplicate-detection": "true",
        "--default-message-time-to-live": "P1D",
        "--enable-dead-lettering-on-message-expiration": "false",
    }


def test_window_without_duplicate_detection_in_the_file_is_ignored_with_a_warning(tmp_path):
    queues = file_queues()
    queues[REFRESH_QUEUE] = {"maxDeliveryCount": 10, "lockDuration": "PT5M"}
    env = {**REQUIRED, "DUPLICATE_DETECTION_WINDOW": "PT3H"}
    result = run_deploy(env, "--dry-run", script=script_with_queue_file(tmp_path, queues))
    assert result.returncode == 0, result.stderr
    assert "DUPLICATE_DETECTION_WINDOW ignored" in result.stderr
    refresh = queue_command(az_lines(result.stdout), REFRESH_QUEUE)
    assert queue_options(refresh) == {"--max-delivery-count": "10", "--lock-duration": "PT5M"}


def test_every_queue_the_app_sends_to_is_created(full):
    from shared.messaging import SERVICE_BUS_QUEUES

    created = {option(argv, "--name") for argv in commands(full, "servicebus", "queue", "create")}
    assert set(SERVICE_BUS_QUEUES.values()) <= created


def test_queue_names_match_the_function_bindings(full):
    created = {option(argv, "--name") for argv in commands(full, "servicebus", "queue", "create")}
    for function_json in REPO.glob("*/function.json"):
        for binding in json.loads(function_json.read_text())["bindings"]:
            if binding["type"] == "serviceBusTrigger":
                assert binding["queueName"] in created
                assert binding["connection"] == "ServiceBusConnection"


def test_refresh_queue_max_delivery_count_defaults_to_the_app_default(minimal):
    refresh = queue_command(minimal, REFRESH_QUEUE)
    assert option(refresh, "--max-delivery-count") == "10"
    assert app_settings(minimal)["TOKEN_REFRESH_MAX_DELIVERY_COUNT"] == "10"


def test_app_settings_use_identity_and_no_keys(full):
    settings = app_settings(full)
    storage = option(commands(full, "storage", "account", "create")[0], "--name")
    namespace = option(commands(full, "servicebus", "namespace", "create")[0], "--name")
    assert settings["AzureWebJobsStorage__accountName"] == storage
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["ServiceBusConnection__fullyQualifiedNamespace"] == f"{namespace}.servicebus.windows.net"
    assert settings["ServiceBusConnection__credential"] == "managedidentity"
    client_ids = {
        settings[name]
        for name in ("AzureWebJobsStorage__clientId", "ServiceBusConnection__clientId", "AZURE_CLIENT_ID")
    }
    assert client_ids == {"<identity-client-id>"}
    assert settings["COSMOS_ENDPOINT"] == "<cosmos-document-endpoint>"
    for name in ("COSMOS_KEY", "ServiceBusConnection", "AzureWebJobsStorage"):
        assert name not in settings
    assert settings["TOKEN_REFRESH_INTERVAL_MS"] == "3600000"
    assert settings["TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS"] == "4200000"
    assert settings["TOKEN_REFRESH_MAX_DELIVERY_COUNT"] == FULL["TOKEN_REFRESH_MAX_DELIVERY_COUNT"]
    assert settings["TOKEN_REFRESH_PAGE_SIZE"] == "100"  # optional settings are passed through
    assert settings["TOKEN_REFRESH_RATE_LIMITS"] == "salesforce=5/s,*=50/s"  # '=' and '*' inside survive az
    assert settings["COSMOS_STATE_CONTAINER"] == "token_refresh_state"
    assert settings["INTEGRATION_MANAGER_URL"] == FULL["INTEGRATION_MANAGER_URL"]
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=<identity-client-id>;Authorization=AAD"
    # The worker configures Azure Monitor OpenTelemetry (which reads the authentication string above).
    assert settings["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"] == "true"
    for argv in commands(full, "functionapp", "config", "appsettings"):
        line = shlex.join(argv)
        assert not any(marker in line for marker in KEY_MARKERS), line
    (delete,) = commands(full, "functionapp", "config", "appsettings", "delete")
    removed = option_values(delete, "--setting-names")
    assert {"AzureWebJobsStorage", "ServiceBusConnection", "COSMOS_KEY"} <= set(removed)


def test_secrets_go_to_key_vault_and_are_never_printed(full_run, full):
    for output in (full_run.stdout, full_run.stderr):
        assert RABBITMQ_SECRET not in output
        assert MANAGER_SECRET not in output
        assert "rabbit-canary" not in output
    vault = option(commands(full, "keyvault", "create")[0], "--name")
    secrets = commands(full, "keyvault", "secret", "set")
    assert {option(argv, "--name") for argv in secrets} == {"rabbitmq-url", "integration-manager-token"}
    for argv in secrets:
        assert option(argv, "--file") == "/dev/stdin"
        assert "--value" not in argv
    settings = app_settings(full)
    base = f"https://{vault}.vault.azure.net/secrets"
    assert settings["RABBITMQ_URL"] == f"@Microsoft.KeyVault(SecretUri={base}/rabbitmq-url/)"
    assert settings["INTEGRATION_MANAGER_TOKEN"] == f"@Microsoft.KeyVault(SecretUri={base}/integration-manager-token/)"
    (update,) = commands(full, "functionapp", "update")
    assert option(update, "--set").startswith("keyVaultReferenceIdentity=/subscriptions/")
    assert option(commands(full, "keyvault", "create")[0], "--enable-rbac-authorization") == "true"


def test_without_optional_settings(minimal_run, minimal):
    assert not commands(minimal, "keyvault", "secret", "set")
    assert not commands(minimal, "monitor", "action-group", "create")
    settings = app_settings(minimal)
    assert "RABBITMQ_URL" not in settings
    assert "INTEGRATION_MANAGER_TOKEN" not in settings
    assert settings["INTEGRATION_MANAGER_URL"] == "https://integration-manager.invalid"
    assert "INTEGRATION_MANAGER_URL not given" in minimal_run.stderr
    for alert in commands(minimal, "monitor", "metrics", "alert", "create"):
        assert "--action" not in alert


def test_identity_roles_are_least_privilege(full):
    identity = "<identity-principal-id>"
    roles = {
        (option(argv, "--role"), option(argv, "--scope").rsplit("/providers/", 1)[1].split("/")[0])
        for argv in commands(full, "role", "assignment", "create")
        if option(argv, "--assignee-object-id") == identity
    }
    assert roles == {
        ("Azure Service Bus Data Sender", "Microsoft.ServiceBus"),
        ("Azure Service Bus Data Receiver", "Microsoft.ServiceBus"),
        ("Storage Blob Data Owner", "Microsoft.Storage"),
        ("Storage Queue Data Contributor", "Microsoft.Storage"),
        ("Storage Table Data Contributor", "Microsoft.Storage"),
        ("Key Vault Secrets User", "Microsoft.KeyVault"),
        ("Monitoring Metrics Publisher", "Microsoft.Insights"),
    }
    for argv in commands(full, "role", "assignment", "create"):
        assert option(argv, "--role") not in ("Owner", "Contributor")


COSMOS_READER = "00000000-0000-0000-0000-000000000001"  # Cosmos DB Built-in Data Reader
COSMOS_CONTRIBUTOR = "00000000-0000-0000-0000-000000000002"  # Cosmos DB Built-in Data Contributor


def guid_of(text: str) -> str:
    """deploy.sh's guid_of: the role assignment id derived from text."""
    hex_ = hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def test_cosmos_roles_read_connections_and_write_only_the_state_container(full):
    """shared/connection_store.py only queries the connections container; every write goes to the state container
    (shared/claim.py, shared/state_store.py): Data Reader on the one, Data Contributor on the other, nothing on the
    account."""
    creates = commands(full, "cosmosdb", "sql", "role", "assignment", "create")
    assert {(option(argv, "--role-definition-id"), option(argv, "--scope")) for argv in creates} == {
        (COSMOS_READER, "/dbs/integrations/colls/integration_connections"),
        (COSMOS_CONTRIBUTOR, "/dbs/integrations/colls/token_refresh_state"),
    }
    for argv in creates:
        assert option(argv, "--principal-id") == "<identity-principal-id>"
        assert option(argv, "--account-name") == FULL["COSMOS_ACCOUNT"]
    assert len({option(argv, "--role-assignment-id") for argv in creates}) == 2
    # The account-wide Data Contributor of earlier deployments (its id derived the way they derived it) is
    # removed, after the scoped assignments exist.
    (delete,) = commands(full, "cosmosdb", "sql", "role", "assignment", "delete")
    account_wide = guid_of(f"{FULL['COSMOS_ACCOUNT']}/<identity-principal-id>/{COSMOS_CONTRIBUTOR}")
    assert option(delete, "--role-assignment-id") == account_wide
    assert "--yes" in delete
    assert full.index(delete) > max(full.index(argv) for argv in creates)


def test_cosmos_role_scopes_follow_the_names_given():
    env = {**REQUIRED, "COSMOS_DATABASE": "platform", "COSMOS_CONNECTIONS_CONTAINER": "conns",
           "COSMOS_STATE_CONTAINER": "refresh_state"}  # fmt: skip
    result = run_deploy(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    creates = commands(az_lines(result.stdout), "cosmosdb", "sql", "role", "assignment", "create")
    assert {option(argv, "--scope") for argv in creates} == {
        "/dbs/platform/colls/conns",
        "/dbs/platform/colls/refresh_state",
    }


def test_function_app_state_container_alert_and_publish(full):
    (create,) = commands(full, "functionapp", "create")
    assert option(create, "--flexconsumption-location") == FULL["LOCATION"]
    assert option(create, "--runtime") == "python"
    assert option(create, "--runtime-version") == "3.13"  # the Python whose worker requirements.txt pins
    assert option(create, "--assign-identity").endswith("/userAssignedIdentities/token-refresh-test-identity")
    assert option(create, "--deployment-storage-auth-type") == "UserAssignedIdentity"

    (container,) = commands(full, "cosmosdb", "sql", "container", "create")
    assert option(container, "--partition-key-path") == "/id"
    assert option(container, "--ttl") == "-1"
    assert option(container, "--name") == "token_refresh_state"

    metric_alerts = commands(full, "monitor", "metrics", "alert", "create")
    [alert] = [argv for argv in metric_alerts if option(argv, "--name") == "token-refresh-test-dead-letters"]
    assert "DeadletteredMessages" in option(alert, "--condition")
    assert "/Microsoft.ServiceBus/namespaces/" in option(alert, "--scopes")
    assert option(alert, "--action").endswith("/actionGroups/token-refresh-test-alerts")
    (group,) = commands(full, "monitor", "action-group", "create")
    assert option_values(group, "--action")[-1] == FULL["ALERT_EMAIL"]

    (publish,) = commands(full, "functionapp", "deployment", "source", "config-zip")
    assert option(publish, "--build-remote") == "true"
    assert option(publish, "--src").endswith(".zip")
    assert publish == commands(full, "functionapp")[-1], "the code is published last"


def worker_pin(requirements: str) -> tuple[str, str, str]:
    """(operator, version, marker) of the azure-functions-runtime-v1 line of a requirements file."""
    from packaging.requirements import Requirement

    lines = [line for line in requirements.splitlines() if line.startswith("azure-functions-runtime-v1")]
    [requirement] = [Requirement(line) for line in lines]
    [specifier] = requirement.specifier
    return specifier.operator, specifier.version, str(requirement.marker)


# The version the real-worker tests ran on this machine (they run on 3.13; CI runs 3.13 first).
WORKER_VERSION_TESTED = (
    importlib.metadata.version("azure-functions-runtime-v1")
    if sys.version_info >= (3, 13)
    else worker_pin((REPO / "requirements.txt").read_text())[1]
)


# What the zip holds: these paths' git-tracked files, only Python sources and function.json in folders.
PACKAGE_PATHS = (
    "host.json",
    "requirements.txt",
    "check_expiring_timer",
    "manager_check_handler",
    "sync_refresh_handler",
    "shared",
)


def tracked_files(root: Path, *paths: str) -> list[str]:
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", *paths], capture_output=True, check=True)
    return sorted(name for name in listed.stdout.decode().split("\0") if name and (root / name).is_file())


def expected_package() -> list[str]:
    return [
        name
        for name in tracked_files(REPO, *PACKAGE_PATHS)
        if "/" not in name or name.endswith(".py") or name.endswith("/function.json")
    ]


@pytest.fixture
def app_checkout(tmp_path: Path) -> Path:
    """A git checkout of the app's tracked files (this working tree's versions), with the decoys a
    developer's tree has: caches, stray zips, bytecode, local settings, an untracked module, and a
    tracked file that is not source."""
    copy = tmp_path / "app"
    for name in tracked_files(REPO):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    (copy / "shared" / "NOTES.md").write_text("not source\n")
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), "add", "-A"], check=True)
    for decoy in (
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/0.1/cache",
        "stray.zip",
        "shared/stray.zip",
        "shared/__pycache__/settings.cpython-313.pyc",
        "check_expiring_timer/__pycache__/__init__.cpython-313.pyc",
        "local.settings.json",
        "shared/scratch.py",
    ):
        (copy / decoy).parent.mkdir(parents=True, exist_ok=True)
        (copy / decoy).write_text("decoy\n")
    return copy


def test_package_is_the_allowlist_of_tracked_sources(app_checkout, tmp_path):
    zip_path = tmp_path / "app.zip"
    result = run_deploy({}, "--package", str(zip_path), script=app_checkout / "scripts" / "deploy.sh")
    assert result.returncode == 0, result.stderr
    names = zipfile.ZipFile(zip_path).namelist()
    assert names == expected_package()
    assert {"host.json", "shared/settings.py", "sync_refresh_handler/function.json"} <= set(names)
    assert "shared/scratch.py" in result.stderr  # untracked: left out, and said so
    # On Python 3.13 the deployed app runs exactly the worker the real-worker tests run.
    requirements = zipfile.ZipFile(zip_path).read("requirements.txt").decode()
    assert worker_pin(requirements) == ("==", WORKER_VERSION_TESTED, 'python_version >= "3.13"')
    assert "azure-monitor-opentelemetry" in requirements
    # Same tree, same bytes: a deployment can be rebuilt from a commit.
    again = tmp_path / "again.zip"
    assert run_deploy({}, "--package", str(again), script=app_checkout / "scripts" / "deploy.sh").returncode == 0
    assert again.read_bytes() == zip_path.read_bytes()


# --- a run against a stand-in az: the same commands, secrets only on stdin ------------------------

FAKE_VALUES = {
    "id": "11111111-2222-3333-4444-555555555555",
    "principalId": "0a0b0c0d-principal",
    "clientId": "0e0f0a0b-client",
    "properties.ConnectionString": "InstrumentationKey=0000;IngestionEndpoint=https://westeurope.in.example/",
    "documentEndpoint": "https://platform-cosmos.documents.azure.com:443/",
}
PLACEHOLDER_VALUES = {
    "<subscription-id>": FAKE_VALUES["id"],
    "<deployer-object-id>": FAKE_VALUES["id"],
    "<identity-principal-id>": FAKE_VALUES["principalId"],
    "<identity-client-id>": FAKE_VALUES["clientId"],
    "<app-insights-connection-string>": FAKE_VALUES["properties.ConnectionString"],
    "<cosmos-document-endpoint>": FAKE_VALUES["documentEndpoint"],
}
FAKE_AZ = """#!{python}
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if "/dev/stdin" in args else ""
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
# FAKE_AZ_ANSWERS: {{query: [exit code, stdout, stderr]}} for the commands with that --query
answers = json.loads(os.environ.get("FAKE_AZ_ANSWERS", "{{}}"))
if "--query" in args and args[args.index("--query") + 1] in answers:
    code, out, err = answers[args[args.index("--query") + 1]]
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(code)
if "show" in args[:4] and args[-2:] == ["--output", "none"]:
    # FAKE_AZ_EXISTING: the --name values of resources that exist; every other one is not found (created)
    existing = json.loads(os.environ.get("FAKE_AZ_EXISTING", "[]"))
    sys.exit(0 if "--name" in args and args[args.index("--name") + 1] in existing else 3)
if "--query" in args:
    print({values!r}.get(args[args.index("--query") + 1], ""))
"""


def test_a_real_run_runs_the_dry_run_commands_and_pipes_secrets(tmp_path, full_run):
    fake_az = tmp_path / "az"
    fake_az.write_text(FAKE_AZ.format(python=sys.executable, values=FAKE_VALUES))
    fake_az.chmod(0o755)
    log = tmp_path / "az.log"
    zip_path = tmp_path / "app.zip"
    env = {**FULL, "AZURE_CLI": str(fake_az), "FAKE_AZ_LOG": str(log), "DEPLOY_ZIP": str(zip_path)}
    result = run_deploy(env)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]

    def masked(argv: list[str]) -> list[str]:  # the Cosmos role assignment id is derived from the principal id
        return ["<guid>" if i and argv[i - 1] == "--role-assignment-id" else token for i, token in enumerate(argv)]

    expected = []
    for argv in az_lines(full_run.stdout):
        line = shlex.join(argv[1:])
        for placeholder, value in PLACEHOLDER_VALUES.items():
            line = line.replace(placeholder, value)
        expected.append(masked(shlex.split(line)))
    expected = [argv for argv in expected if argv[:4] != ["functionapp", "deployment", "source", "config-zip"]]
    actual = [masked(call["argv"]) for call in calls]
    publish = actual.pop()
    assert actual == expected
    assert publish[:4] == ["functionapp", "deployment", "source", "config-zip"]
    assert option(publish, "--src") == str(zip_path)
    assert "host.json" in zipfile.ZipFile(zip_path).namelist()

    piped = {option(call["argv"], "--name"): call["stdin"] for call in calls if call["stdin"]}
    assert piped == {"rabbitmq-url": RABBITMQ_SECRET, "integration-manager-token": MANAGER_SECRET}
    for call in calls:
        assert not any(secret in " ".join(call["argv"]) for secret in (RABBITMQ_SECRET, MANAGER_SECRET))
    for output in (result.stdout, result.stderr):
        assert RABBITMQ_SECRET not in output
        assert MANAGER_SECRET not in output
    assert "deploy: + az group create" in result.stderr  # each command is shown as it runs


def run_with_fake_az(
    tmp_path: Path,
    answers: dict[str, list],
    script: Path = SCRIPT,
    existing: tuple[str, ...] = (),
    **variables: str,
) -> tuple[subprocess.CompletedProcess[str], list]:
    fake_az = tmp_path / "az"
    fake_az.write_text(FAKE_AZ.format(python=sys.executable, values=FAKE_VALUES))
    fake_az.chmod(0o755)
    log = tmp_path / "az.log"
    env = {
        **REQUIRED,
        **variables,
        "AZURE_CLI": str(fake_az),
        "FAKE_AZ_LOG": str(log),
        "FAKE_AZ_ANSWERS": json.dumps(answers),
        "FAKE_AZ_EXISTING": json.dumps(existing),
        "DEPLOY_ZIP": str(tmp_path / "app.zip"),
    }
    result = run_deploy(env, script=script)
    return result, [json.loads(line)["argv"] for line in log.read_text().splitlines()]


SESSION_CHECK = [
    "servicebus", "queue", "show", "--resource-group", REQUIRED["RESOURCE_GROUP"], "--namespace-name",
    "token-refresh-test-bus", "--name", REFRESH_QUEUE, "--query", "requiresSession", "--output", "tsv",
]  # fmt: skip


def test_a_real_run_stops_when_the_refresh_queue_exists_with_sessions(tmp_path):
    """Service Bus cannot change RequiresSession: a queue an earlier deployment made with sessions must be
    deleted first, and the script says so in one line before it creates or updates any queue."""
    result, calls = run_with_fake_az(tmp_path, {"requiresSession": [0, "true\n", ""]})
    assert result.returncode == 1
    assert SESSION_CHECK in calls
    assert not [argv for argv in calls if argv[:3] == ["servicebus", "queue", "create"]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert len(errors) == 1, result.stderr
    [error] = errors
    assert REFRESH_QUEUE in error and "token-refresh-test-bus" in error
    assert "RequiresSession" in error
    assert (
        f"az servicebus queue delete --resource-group {REQUIRED['RESOURCE_GROUP']} "
        f"--namespace-name token-refresh-test-bus --name {REFRESH_QUEUE}"
    ) in error
    assert "drain" in error and "again" in error


def test_a_real_run_stops_when_the_file_asks_for_sessions_the_existing_queue_lacks(tmp_path):
    queues = file_queues()
    queues[REFRESH_QUEUE] = {**queues[REFRESH_QUEUE], "requiresSession": True}
    script = script_with_queue_file(tmp_path / "app", queues)
    result, calls = run_with_fake_az(tmp_path, {"requiresSession": [0, "false\n", ""]}, script=script)
    assert result.returncode == 1
    assert not [argv for argv in calls if argv[:3] == ["servicebus", "queue", "create"]]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert "RequiresSession=false" in error and "says true" in error


@pytest.mark.parametrize(
    "answer",
    [
        [0, "false\n", ""],  # created by this script: no sessions
        [3, "", "ERROR: (ResourceNotFound) The messaging entity could not be found.\n"],  # a first deployment
    ],
    ids=["without-sessions", "missing"],
)
def test_a_real_run_goes_on_when_the_refresh_queue_has_no_sessions_or_is_missing(tmp_path, answer):
    result, calls = run_with_fake_az(tmp_path, {"requiresSession": answer})
    assert result.returncode == 0, result.stderr
    creates = [argv for argv in calls if argv[:3] == ["servicebus", "queue", "create"]]
    assert calls.index(SESSION_CHECK) < calls.index(creates[0])
    assert sorted(option(argv, "--name") for argv in creates) == sorted(file_queues())


def test_a_real_run_stops_when_the_session_check_fails_otherwise(tmp_path):
    result, calls = run_with_fake_az(
        tmp_path, {"requiresSession": [1, "", "ERROR: (AuthorizationFailed) The client does not have authorization\n"]}
    )
    assert result.returncode == 1
    assert "AuthorizationFailed" in result.stderr
    assert not [argv for argv in calls if argv[:3] == ["servicebus", "queue", "create"]]


# --- what the deployment adds for operations: alerts, diagnostics, limits ---------------------------------

ALERT_RULE_TYPE = "Microsoft.Insights/scheduledQueryRules"


def log_alerts(lines: list[list[str]]) -> dict[str, dict]:
    """The log search alert rules (ARM bodies) by name."""
    return {
        option(argv, "--name"): json.loads(option(argv, "--properties"))
        for argv in commands(lines, "resource", "create")
        if option(argv, "--resource-type") == ALERT_RULE_TYPE
    }


def alert_query(rule: dict) -> str:
    [condition] = rule["properties"]["criteria"]["allOf"]
    return condition["query"]


def lookback_minutes(rule: dict) -> int:
    return int(re.search(r"ago\((\d+)m\)", alert_query(rule)).group(1))


def window_minutes(rule: dict) -> int:
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?", rule["properties"]["windowSize"])
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_alert_rules_watch_the_app_alarms_and_go_to_the_action_group(full):
    from shared.failure_waves import ALARM as SYSTEMIC_ALARM
    from shared.refresh_schedule import BACKLOG_ALARM

    rules = log_alerts(full)
    app = FULL["APP_NAME"]
    names = ("systemic-failure", "refresh-backlog", "check-missed", "retryable-failures")
    assert set(rules) == {f"{app}-{name}" for name in names}
    in_group = f"/subscriptions/<subscription-id>/resourceGroups/{FULL['RESOURCE_GROUP']}/providers"
    group = f"{in_group}/Microsoft.Insights/actionGroups/{app}-alerts"
    for name, rule in rules.items():
        properties = rule["properties"]
        assert rule["kind"] == "LogAlert" and rule["location"] == FULL["LOCATION"]
        assert properties["scopes"] == [f"{in_group}/Microsoft.Insights/components/{app}-insights"]
        assert properties["actions"]["actionGroups"] == [group], name
        assert properties["enabled"] is True and properties["autoMitigate"] is True
        assert alert_query(rule).startswith("traces\n")
        assert window_minutes(rule) >= lookback_minutes(rule), name  # the window covers the query's own bound
        assert "docs/operations.md" in properties["description"]
    # The alarms the app logs (customDimensions.alarm), by the constants the app logs them with.
    assert f'customDimensions.alarm) == "{SYSTEMIC_ALARM}"' in alert_query(rules[f"{app}-systemic-failure"])
    assert f'customDimensions.alarm) == "{BACKLOG_ALARM}"' in alert_query(rules[f"{app}-refresh-backlog"])
    assert rules[f"{app}-systemic-failure"]["properties"]["severity"] == 1
    assert rules[f"{app}-check-missed"]["properties"]["severity"] == 1
    # The dead-letter alert stays, to the same group.
    metric_alerts = {option(argv, "--name"): argv for argv in commands(full, "monitor", "metrics", "alert", "create")}
    assert option(metric_alerts[f"{app}-dead-letters"], "--action") == group
    assert option(metric_alerts[f"{app}-outcome-queue-filling"], "--action") == group


def test_an_outcome_queue_filling_up_alerts_before_sends_fail(minimal):
    alerts = {option(argv, "--name"): argv for argv in commands(minimal, "monitor", "metrics", "alert", "create")}
    alert = alerts[f"{REQUIRED['APP_NAME']}-outcome-queue-filling"]
    assert "/Microsoft.ServiceBus/namespaces/" in option(alert, "--scopes")
    condition = option(alert, "--condition")
    assert condition.startswith(f"max Size > {5120 * 1024 * 1024 * 8 // 10} where EntityName includes ")
    assert condition.split(" includes ", 1)[1].split(" or ") == list(OUTCOME_QUEUES)


def test_the_log_lines_the_alerts_count_are_the_app_own():
    """The missed-check and retryable-failure rules count lines by their text: the app must log exactly that."""
    check = (REPO / "shared" / "expiring_check.py").read_text()
    refresh = (REPO / "shared" / "token_refresh.py").read_text()
    assert '"Check-expiring run finished (' in check
    assert '"OAuth tokens refreshed successfully (' in refresh
    # The retryable-failure rule: a line that starts so, and says retryable=True or False.
    [failed] = [line for line in refresh.splitlines() if '"OAuth token refresh failed (' in line]
    assert " retryable=%s " in failed


@pytest.mark.parametrize(
    ("interval_ms", "lookback"),
    [("3600000", 130), ("900000", 40), ("61000", 14), ("1000", 12), ("86100000", 2880)],
    ids=["hourly", "15-min", "rounded-up", "every-tick", "longest"],
)
def test_missed_check_alert_fires_after_two_intervals(interval_ms, lookback):
    threshold = str(int(interval_ms) + 600000)
    env = {**REQUIRED, "TOKEN_REFRESH_INTERVAL_MS": interval_ms, "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": threshold}
    result = run_deploy(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    rule = log_alerts(az_lines(result.stdout))[f"{REQUIRED['APP_NAME']}-check-missed"]
    # Two intervals in whole minutes (at least one timer tick each) + 10 minutes for the lines to reach Azure.
    assert lookback_minutes(rule) == lookback
    query = alert_query(rule)
    assert 'message startswith "Check-expiring run finished"' in query
    assert query.endswith("| summarize runs = count() | where runs == 0")  # one row when no check ran


def test_no_missed_check_alert_when_two_intervals_exceed_what_log_alerts_see():
    env = {**REQUIRED, "TOKEN_REFRESH_INTERVAL_MS": "86400000", "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "87000000"}
    result = run_deploy(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"{REQUIRED['APP_NAME']}-check-missed" not in log_alerts(az_lines(result.stdout))
    assert "no alert on missed checks" in result.stderr


def test_retryable_failure_rate_alert_uses_the_percentage_given(minimal):
    rule = log_alerts(minimal)[f"{REQUIRED['APP_NAME']}-retryable-failures"]
    assert alert_query(rule).endswith("| where retryable >= 5 and retryable * 100 >= outcomes * 10")
    result = run_deploy({**REQUIRED, "RETRYABLE_FAILURE_ALERT_PERCENT": "25"}, "--dry-run")
    rule = log_alerts(az_lines(result.stdout))[f"{REQUIRED['APP_NAME']}-retryable-failures"]
    query = alert_query(rule)
    assert 'countif(message contains_cs "retryable=True")' in query
    assert query.endswith("| where retryable >= 5 and retryable * 100 >= outcomes * 25")
    assert lookback_minutes(rule) == 60


def test_without_a_group_the_alerts_fire_without_actions(minimal_run, minimal):
    for rule in log_alerts(minimal).values():
        assert rule["properties"]["actions"]["actionGroups"] == []
    assert "nobody is notified" in minimal_run.stderr


@pytest.fixture(scope="module")
def action_group_run() -> subprocess.CompletedProcess[str]:
    result = run_deploy({**REQUIRED, "ACTION_GROUP": "platform-oncall"}, "--dry-run")
    assert result.returncode == 0, result.stderr
    return result


def test_an_existing_action_group_is_checked_and_used(action_group_run):
    lines = az_lines(action_group_run.stdout)
    group = (
        f"/subscriptions/<subscription-id>/resourceGroups/{REQUIRED['RESOURCE_GROUP']}"
        "/providers/Microsoft.Insights/actionGroups/platform-oncall"
    )
    (show,) = commands(lines, "monitor", "action-group", "show")
    assert option(show, "--ids") == group
    assert not commands(lines, "monitor", "action-group", "create")
    assert {tuple(rule["properties"]["actions"]["actionGroups"]) for rule in log_alerts(lines).values()} == {(group,)}
    for metric_alert in commands(lines, "monitor", "metrics", "alert", "create"):
        assert option(metric_alert, "--action") == group
    # Another resource group's, by its id.
    other = "/subscriptions/0000/resourceGroups/rg-platform/providers/Microsoft.Insights/actionGroups/oncall"
    result = run_deploy({**REQUIRED, "ACTION_GROUP": other}, "--dry-run")
    rules = log_alerts(az_lines(result.stdout))
    assert {tuple(rule["properties"]["actions"]["actionGroups"]) for rule in rules.values()} == {(other,)}


def test_a_real_run_stops_when_the_action_group_does_not_exist(tmp_path):
    result, calls = run_with_fake_az(
        tmp_path, {"name": [3, "", "ERROR: (ResourceNotFound) not found\n"]}, ACTION_GROUP="platform-oncall"
    )
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert "ACTION_GROUP" in error and "platform-oncall" in error
    assert not [argv for argv in calls if argv[:2] == ["resource", "create"] and ALERT_RULE_TYPE in argv]


def test_service_bus_and_function_app_metrics_go_to_the_workspace(full):
    settings = commands(full, "monitor", "diagnostic-settings", "create")
    by_type = {option(argv, "--resource").split("/providers/")[1].rsplit("/", 1)[0]: argv for argv in settings}
    assert set(by_type) == {"Microsoft.ServiceBus/namespaces", "Microsoft.Web/sites"}
    workspace = option(commands(full, "monitor", "log-analytics", "workspace", "create")[0], "--workspace-name")
    for argv in settings:
        assert option(argv, "--workspace").endswith(f"/Microsoft.OperationalInsights/workspaces/{workspace}")
        # AzureMetrics: what the KQL of docs/operations.md reads (DeadletteredMessages...)
        assert json.loads(option(argv, "--metrics")) == [{"category": "AllMetrics", "enabled": True}]
    bus_logs = json.loads(option(by_type["Microsoft.ServiceBus/namespaces"], "--logs"))
    assert bus_logs == [{"categoryGroup": "allLogs", "enabled": True}]
    assert "--logs" not in by_type["Microsoft.Web/sites"]  # its logs reach the workspace via Application Insights
    assert "AzureMetrics" in (REPO / "docs" / "operations.md").read_text()


def test_outcome_queues_are_the_queues_no_function_reads(full):
    from shared.messaging import SERVICE_BUS_QUEUES

    triggers = {
        binding["queueName"]
        for function_json in REPO.glob("*/function.json")
        for binding in json.loads(function_json.read_text())["bindings"]
        if binding["type"] == "serviceBusTrigger"
    }
    assert set(SERVICE_BUS_QUEUES.values()) - triggers == set(OUTCOME_QUEUES)
    capped = {
        option(argv, "--name") for argv in commands(full, "servicebus", "queue", "create") if "--max-size" in argv
    }
    assert capped == set(OUTCOME_QUEUES)
    for queue in OUTCOME_QUEUES:
        argv = queue_command(full, queue)
        assert option(argv, "--default-message-time-to-live") == "P1D"
        # Expired outcomes are dropped: dead-lettered, they would fill the dead-letter queue and page someone.
        assert "--enable-dead-lettering-on-message-expiration" not in argv


def test_outcome_queue_ttl_and_size_can_be_set_and_the_queue_file_ttl_wins(tmp_path):
    env = {**REQUIRED, "OUTCOME_QUEUE_TTL": "PT12H", "OUTCOME_QUEUE_MAX_SIZE_MB": "2048"}
    result = run_deploy(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    for queue in OUTCOME_QUEUES:
        argv = queue_command(az_lines(result.stdout), queue)
        assert (option(argv, "--default-message-time-to-live"), option(argv, "--max-size")) == ("PT12H", "2048")
    queues = file_queues()
    queues["integration.token.refreshed"] = {"defaultMessageTimeToLive": "P3D"}
    result = run_deploy(REQUIRED, "--dry-run", script=script_with_queue_file(tmp_path, queues))
    argv = queue_command(az_lines(result.stdout), "integration.token.refreshed")
    assert option(argv, "--default-message-time-to-live") == "P3D"


def test_state_container_ttl_is_set_on_every_run(full, minimal, tmp_path):
    for lines in (full, minimal):
        (update,) = commands(lines, "cosmosdb", "sql", "container", "update")
        assert (option(update, "--name"), option(update, "--ttl")) == ("token_refresh_state", "-1")
    # A run against an existing container updates it and creates nothing.
    result, calls = run_with_fake_az(tmp_path, {}, existing=("token_refresh_state",))
    assert result.returncode == 0, result.stderr
    containers = [argv for argv in calls if argv[:3] == ["cosmosdb", "sql", "container"]]
    assert not [argv for argv in containers if argv[3] == "create"]
    [update] = [argv for argv in containers if argv[3] == "update"]
    assert (option(update, "--name"), option(update, "--ttl")) == ("token_refresh_state", "-1")


INDEX_QUERY = "resource.indexingPolicy"
DEFAULT_POLICY = {"indexingMode": "consistent", "includedPaths": [{"path": "/*"}],
                  "excludedPaths": [{"path": '/"_etag"/?'}]}  # fmt: skip


def test_dry_run_prints_the_index_check(full):
    [check] = [argv for argv in commands(full, "cosmosdb", "sql", "container", "show") if "--query" in argv]
    assert option(check, "--name") == "integration_connections"
    assert option(check, "--query") == INDEX_QUERY


@pytest.mark.parametrize(
    ("policy", "warned"),
    [
        (DEFAULT_POLICY, False),
        ({**DEFAULT_POLICY, "excludedPaths": [{"path": "/oauth/*"}]}, True),
        # The more precise path wins: excluded under /*, included by its own path.
        ({"includedPaths": [{"path": "/oauth/expiresAt/?"}], "excludedPaths": [{"path": "/*"}]}, False),
        ({**DEFAULT_POLICY, "indexingMode": "none"}, True),
    ],
    ids=["default", "oauth-excluded", "only-expiresAt", "none"],
)
def test_a_real_run_warns_with_the_fix_when_the_index_leaves_expires_at_out(tmp_path, policy, warned):
    result, _ = run_with_fake_az(tmp_path, {INDEX_QUERY: [0, json.dumps(policy) + "\n", ""]})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "/oauth/expiresAt" in line and "warning" in line]
    if warned:
        [warning] = warnings
        assert "ORDER BY" in warning and "includedPaths" in warning
        assert "az cosmosdb sql container update --account-name platform-cosmos" in warning and "--idx" in warning
    else:
        assert not warnings, warnings


def test_key_vault_purge_protection_on_new_and_existing_vaults(full):
    (create,) = commands(full, "keyvault", "create")
    assert option(create, "--enable-purge-protection") == "true"
    (update,) = commands(full, "keyvault", "update")
    assert (option(update, "--name"), option(update, "--enable-purge-protection")) == (option(create, "--name"), "true")


def test_instance_cap_and_worker_threads(full, minimal):
    host = json.loads((REPO / "host.json").read_text())
    calls_at_once = host["extensions"]["serviceBus"]["maxConcurrentCalls"]
    for lines in (full, minimal):
        (create,) = commands(lines, "functionapp", "create")
        (scale,) = commands(lines, "functionapp", "scale", "config", "set")
        assert option(create, "--maximum-instance-count") == option(scale, "--maximum-instance-count") == "10"
        assert option(scale, "--instance-memory") == "2048"
        # A thread for every message the trigger hands over at once.
        assert app_settings(lines)["PYTHON_THREADPOOL_THREAD_COUNT"] == str(calls_at_once)
    env = {**REQUIRED, "MAXIMUM_INSTANCE_COUNT": "3", "PYTHON_THREADPOOL_THREAD_COUNT": "8"}
    lines = az_lines(run_deploy(env, "--dry-run").stdout)
    (scale,) = commands(lines, "functionapp", "scale", "config", "set")
    assert option(scale, "--maximum-instance-count") == "3"
    assert app_settings(lines)["PYTHON_THREADPOOL_THREAD_COUNT"] == "8"


# --- every variable is checked before any az command --------------------------------------------------

BAD_VALUES = [
    ("RESOURCE_GROUP", "rg-token-refresh."),
    ("RESOURCE_GROUP", "rg token refresh"),
    ("LOCATION", "West Europe"),
    ("APP_NAME", "-token-refresh"),
    ("COSMOS_ACCOUNT", "Platform_Cosmos"),
    ("COSMOS_RESOURCE_GROUP", "x" * 91),
    ("COSMOS_DATABASE", "integrations/prod"),
    ("COSMOS_CONNECTIONS_CONTAINER", "connections?"),
    ("COSMOS_STATE_CONTAINER", " state"),
    ("STORAGE_ACCOUNT", "st" + "x" * 23),
    ("STORAGE_ACCOUNT", "St-Token"),
    ("SERVICEBUS_NAMESPACE", "tokens-sb"),
    ("SERVICEBUS_NAMESPACE", "1tokens"),
    ("KEY_VAULT", "kv--token"),
    ("KEY_VAULT", "1kv-token"),
    ("IDENTITY_NAME", "id"),
    ("LOG_ANALYTICS_WORKSPACE", "logs-"),
    ("APP_INSIGHTS", "insights."),
    ("DEPLOYMENT_CONTAINER", "App-Package"),
    ("INSTANCE_MEMORY_MB", "1024"),
    ("MAXIMUM_INSTANCE_COUNT", "0"),
    ("MAXIMUM_INSTANCE_COUNT", "ten"),
    ("PYTHON_RUNTIME_VERSION", "3.10"),
    ("PYTHON_THREADPOOL_THREAD_COUNT", "0"),
    ("TOKEN_REFRESH_INTERVAL_MS", "1h"),
    ("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "600000"),  # shorter than the interval
    ("TOKEN_REFRESH_MAX_DELIVERY_COUNT", "ten"),
    ("DUPLICATE_DETECTION_WINDOW", "banana"),
    ("OUTCOME_QUEUE_TTL", "banana"),
    ("OUTCOME_QUEUE_TTL", "P15D"),
    ("OUTCOME_QUEUE_MAX_SIZE_MB", "6000"),
    ("RABBITMQ_EXCHANGE", "integration events"),
    ("INTEGRATION_MANAGER_URL", "http://integration-manager.example.com"),
    ("INTEGRATION_MANAGER_URL", "https://svc:url-canary-77@integration-manager.example.com"),
    ("ACTION_GROUP", "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Insights/metricAlerts/oncall"),
    ("ALERT_EMAIL", "oncall"),
    ("RETRYABLE_FAILURE_ALERT_PERCENT", "0"),
    ("DEPLOYER_OBJECT_ID", "me"),
    ("DEPLOYER_PRINCIPAL_TYPE", "Robot"),
    ("TOKEN_REFRESH_ENABLED", "yes"),
    ("TOKEN_REFRESH_SKIP_STATUSES", "revoked,,deleted"),
    ("TOKEN_REFRESH_RATE_LIMITS", "salesforce=5"),
    ("TOKEN_REFRESH_PAGE_SIZE", "lots"),
]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2
    assert result.stdout == "", "an az command was printed before the check"
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{name}={value[:20]}" for name, value in BAD_VALUES])
def test_a_bad_variable_stops_before_any_command_with_one_line(name, value):
    error = one_error_line(run_deploy({**REQUIRED, name: value}, "--dry-run"))
    assert error.startswith(f"deploy: error: {name}=")
    assert "; expected " in error  # the value's problem, then the form expected
    assert "url-canary" not in error  # a URL may hold credentials: never shown


def test_action_group_and_alert_email_together_are_refused():
    env = {**REQUIRED, "ACTION_GROUP": "platform-oncall", "ALERT_EMAIL": "ops@example.com"}
    error = one_error_line(run_deploy(env, "--dry-run"))
    assert "ACTION_GROUP" in error and "ALERT_EMAIL" in error


def app_int_settings() -> dict[str, tuple[int, int]]:
    """Every whole-number setting of the app (shared/settings.py) and its limits."""
    import annotated_types

    from shared.settings import Settings

    limits = {}
    for field in Settings.model_fields.values():
        if field.annotation is int:
            low = next(m.ge for m in field.metadata if isinstance(m, annotated_types.Ge))
            high = next(m.le for m in field.metadata if isinstance(m, annotated_types.Le))
            limits[field.alias] = (low, high)
    return limits


def test_every_number_setting_of_the_app_is_checked_against_the_app_limits():
    """deploy.sh refuses what the app would refuse at start, and passes the limits themselves: a new number
    setting, or changed limits, fail here until deploy.sh follows."""
    limits = app_int_settings()
    assert len(limits) >= 15
    for name, (low, high) in limits.items():
        for outside in (low - 1, high + 1):
            if outside < 0:
                continue
            env = {**REQUIRED, name: str(outside)}
            if name == "TOKEN_REFRESH_INTERVAL_MS":
                env["TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS"] = str(outside)
            error = one_error_line(run_deploy(env, "--dry-run"))
            assert error.startswith(f"deploy: error: {name}={outside}:"), error
    for edge in (0, 1):  # every setting at its lowest, then at its highest: accepted and set on the app
        env = {**REQUIRED, **{name: str(bounds[edge]) for name, bounds in limits.items()}}
        env["TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS"] = str(
            max(int(env["TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS"]), int(env["TOKEN_REFRESH_INTERVAL_MS"]))
        )
        result = run_deploy(env, "--dry-run")
        assert result.returncode == 0, result.stderr
        settings = app_settings(az_lines(result.stdout))
        assert {name: settings.get(name) for name in limits} == {name: env[name] for name in limits}


# --- the real Azure CLI parses every command ------------------------------------------------------

# Runs in the az venv: the Azure CLI's own entry point (`get_default_cli().invoke`, what `az` runs) for
# each command of a JSON list on stdin, in one process, so the ~1-2 s start-up is paid once per shard.
# One stream object stays installed for the whole run (the CLI's log handlers keep a reference to it);
# each command gets a fresh buffer behind it.
AZ_RUNNER = """
import io, json, sys
from azure.cli.core import get_default_cli

class Switch(io.TextIOBase):
    def __init__(self):
        self.target = io.StringIO()
    def write(self, text):
        return self.target.write(text)
    def isatty(self):
        return False

switch = Switch()
real_stdout, sys.stdout, sys.stderr = sys.stdout, switch, switch
results = []
for argv in json.load(sys.stdin):
    switch.target = io.StringIO()
    try:
        code = get_default_cli().invoke(argv, out_file=switch)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    results.append([code, switch.target.getvalue()])
json.dump(results, real_stdout)
"""

# Known-bad commands: the CLI must reject each, or the check would prove nothing.
CONTROLS = {
    ("servicebus", "queue", "create", "--resource-group", "rg", "--namespace-name", "tokens-bus", "--name", "q",
     "--requires-sessions", "true"): "unrecognized arguments",
    ("functionap", "create", "--name", "x"): "misspelled or not recognized",
    ("servicebus", "queue", "create", "--resource-group", "rg", "--namespace-name", "sb", "--name", "q"):
        "InvalidArgumentValue",
}  # fmt: skip


def az_env(config_dir: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(config_dir),
        "AZURE_CONFIG_DIR": str(config_dir),
        "AZURE_CORE_COLLECT_TELEMETRY": "no",
        "AZURE_CORE_NO_COLOR": "true",
        "AZURE_CORE_SURVEY_MESSAGE": "no",
        "AZURE_EXTENSION_USE_DYNAMIC_INSTALL": "no",
    }


def run_shard(argvs: list[list[str]], env: dict[str, str]) -> list[tuple[int, str]]:
    result = subprocess.run(
        [str(AZCLI_VENV / "bin" / "python"), "-c", AZ_RUNNER],
        input=json.dumps(argvs),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [(code, output) for code, output in json.loads(result.stdout)]


def run_az(argv: list[str], env: dict[str, str]) -> list[tuple[int, str]]:
    """The `az` executable itself, once: the entry point works as the shard runner assumes."""
    result = subprocess.run(
        [str(AZ), *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
    )
    return [(result.returncode, result.stdout + result.stderr)]


def command_path(argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    path = []
    for token in argv:
        if token.startswith("-"):
            break
        path.append(token)
    return tuple(path)


def documented_options(help_text: str) -> set[str]:
    """Long options of a command's --help (the argument sections, not the examples)."""
    arguments = help_text.split("\nExamples", 1)[0]
    return {
        name
        for line in re.findall(r"^ {4}--.*$", arguments, flags=re.MULTILINE)
        for name in re.findall(r"--[a-z0-9][\w-]*", line.split(" : ", 1)[0])
    }


def test_real_azure_cli_accepts_every_command(full, minimal, action_group_run, tmp_path):
    if not AZ.exists():
        pytest.fail(
            f"{AZ} is missing: run `bash scripts/install-azure-cli.sh` (installs the Azure CLI into "
            f"{AZCLI_VENV.name}, ~1 min, ~730 MB)"
        )
    started = time.monotonic()
    env = az_env(tmp_path)
    # The first start builds the CLI's command index in the config dir; later starts reuse it.
    [(code, output)] = run_az(["account", "show", "--query", "id", "--output", "tsv"], env)
    assert code == 1 and LOGIN_REQUIRED in output, output

    lines = sorted({tuple(argv[1:]) for argv in full + minimal + az_lines(action_group_run.stdout)})
    paths = sorted({command_path(line) for line in lines})
    jobs = [list(line) for line in lines] + [list(c) for c in CONTROLS] + [[*p, "--help"] for p in paths]
    shards = 2 if (os.cpu_count() or 1) > 1 else 1
    with ThreadPoolExecutor(max_workers=shards + 1) as pool:
        futures = [pool.submit(run_shard, jobs[i::shards], env) for i in range(shards)]
        entry_point = pool.submit(run_az, list(next(iter(CONTROLS))), env)
        shard_results = [future.result() for future in futures]
    results = {}
    for i, shard in enumerate(shard_results):
        for job, result in zip(jobs[i::shards], shard, strict=True):
            results[tuple(job)] = result

    failures = []
    [(code, output)] = entry_point.result()
    if code != 2 or "unrecognized arguments" not in output:
        failures.append(f"the az executable did not reject a bad option ({code}): {output[-300:]}")
    for control, expected in CONTROLS.items():
        code, output = results[control]
        if code not in (1, 2) or expected not in output:
            failures.append(f"control not rejected ({code}): az {shlex.join(control)}: {output[-300:]}")
    for line in lines:
        code, output = results[line]
        if code != 1 or LOGIN_REQUIRED not in output:
            failures.append(f"rejected ({code}): az {shlex.join(line)}\n    {output.strip()[-500:]}")
        # argparse accepts unambiguous abbreviations (--lock for --lock-duration): insist on full names.
        path = command_path(line)
        help_code, help_text = results[(*path, "--help")]
        known = documented_options(help_text) if help_code == 0 else set()
        failures.extend(
            f"{token} is not an option of az {' '.join(path)}"
            for token in line
            if token.startswith("--") and token not in known
        )

    assert not failures, "\n".join(failures)
    elapsed = time.monotonic() - started
    print(f"az parsed {len(lines)} commands and {len(paths)} help pages in {elapsed:.1f} s")
