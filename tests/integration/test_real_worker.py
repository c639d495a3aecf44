"""The app in the real Azure Functions Python worker (`azure-functions-runtime-v1`, the version pinned in
requirements.txt), driven with the host's own messages (tests/support/functions_worker.py).

These tests are the judge of whether Azure can run the app: the worker loads each function from its
function.json and checks main()'s signature against the bindings, converts the host's trigger data
into azure.functions objects and passes its own Context. Calling main() directly skips all of that.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from azure.cosmos import PartitionKey

from localdev.service_bus_model import ModelMessage, ProcessorOptions, ServiceBusModel, queue_properties
from localdev.stand_in_manager import Answer, StandInManager
from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED, parse_event
from shared.messaging import service_bus_message
from tests.support.documents import stored_connection_request
from tests.support.event_taps import DurableTap
from tests.support.fleets import build_fleet
from tests.support.functions_worker import BODY_KINDS, ServiceBusDelivery
from tests.support.helpers import APP_ROOT, MANAGER_TOKEN, check_event, cli_environment, run_cli
from tests.support.service_bus_host import FunctionsHostOnModel

FUNCTIONS = {"check_expiring_timer", "manager_check_handler", "sync_refresh_handler"}


# Loading -----------------------------------------------------------------------------------------


def test_the_worker_loads_every_function_of_the_app(functions_worker):
    assert functions_worker.load_errors == {}
    assert set(functions_worker.loaded) == FUNCTIONS


def load_in_a_fresh_worker(app_root) -> dict:
    # Like the host: the worker process starts in the app's root (its `shared` is the copy's).
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.functions_worker", str(app_root)],
        cwd=app_root,
        env={**os.environ, "PYTHONPATH": str(APP_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def copy_of_the_app(tmp_path):
    root = tmp_path / "app"
    for name in (*FUNCTIONS, "shared"):
        shutil.copytree(APP_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def rename_binding(root):
    path = root / "sync_refresh_handler" / "function.json"
    path.write_text(path.read_text().replace('"name": "message"', '"name": "msg"'))


def optional_context(root):  # the signature every function had before the worker was tested
    path = root / "sync_refresh_handler" / "__init__.py"
    path.write_text(path.read_text().replace("context: func.Context)", "context: func.Context | None = None)"))


def wrong_trigger_type(root):
    path = root / "sync_refresh_handler" / "__init__.py"
    path.write_text(path.read_text().replace("message: func.ServiceBusMessage", "message: func.HttpRequest"))


def renamed_entry_point(root):
    path = root / "sync_refresh_handler" / "__init__.py"
    path.write_text(path.read_text().replace("def main(", "def run("))


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (rename_binding, "parameters are declared in Python but not in function.json: {'message'}"),
        (optional_context, 'the "context" parameter is expected to be of type azure.functions.Context'),
        (wrong_trigger_type, 'type of message binding in function.json "serviceBusTrigger" does not match'),
        (renamed_entry_point, "'main', PosixPath('sync_refresh_handler/__init__.py')"),
    ],
)
def test_a_broken_function_fails_to_load_in_the_worker(tmp_path, break_it, error):
    app = copy_of_the_app(tmp_path)
    assert load_in_a_fresh_worker(app) == {"loaded": sorted(FUNCTIONS), "errors": {}}  # the copy itself loads
    break_it(app)
    outcome = load_in_a_fresh_worker(app)
    assert outcome["loaded"] == ["check_expiring_timer", "manager_check_handler"]
    assert error in outcome["errors"]["sync_refresh_handler"]


# Invocations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("past_due", [False, True])
def test_timer_invocation_publishes_check_expiring(functions_worker, app_env, event_tap, past_due):
    calls = functions_worker.record_arguments("check_expiring_timer")
    result = functions_worker.invoke_timer("check_expiring_timer", past_due=past_due)
    result.raise_for_failure()
    [event] = event_tap.of_type(CHECK_EXPIRING)
    assert set(event["data"]) == {"timestamp", "thresholdTime"}
    [arguments] = calls
    assert arguments["timer"].past_due is past_due
    assert arguments["context"].invocation_id == result.invocation_id
    assert arguments["context"].function_name == "check_expiring_timer"


@pytest.mark.parametrize("body_kind", BODY_KINDS)
def test_service_bus_invocation_gets_the_message_as_sent(
    functions_worker, app_env, cosmos_container, manager, event_tap, body_kind
):
    event = stored_connection_request(cosmos_container, "conn-w1")
    delivery = ServiceBusDelivery(
        body=event.to_json(),
        message_id=event.id,
        delivery_count=2,
        sequence_number=4711,
        content_type="application/cloudevents+json",
        session_id="t-9/github/conn-w1",
        correlation_id="corr-1",
        application_properties={"type": REFRESH_REQUESTED, "attempt": 2},
        body_kind=body_kind,
    )
    calls = functions_worker.record_arguments("sync_refresh_handler")
    result = functions_worker.invoke_service_bus("sync_refresh_handler", delivery)
    result.raise_for_failure()

    [arguments] = calls
    message = arguments["message"]
    assert message.get_body() == delivery.body
    assert message.message_id == delivery.message_id
    assert message.delivery_count == 2
    assert message.sequence_number == 4711
    assert message.content_type == delivery.content_type
    assert message.session_id == delivery.session_id
    assert message.correlation_id == "corr-1"
    assert message.application_properties == delivery.application_properties
    assert message.user_properties == delivery.application_properties
    assert message.lock_token == delivery.lock_token
    assert abs(message.enqueued_time_utc.replace(tzinfo=UTC) - delivery.enqueued_time_utc) < timedelta(milliseconds=1)
    assert arguments["context"].invocation_id == result.invocation_id

    assert [call.connection_id for call in manager.calls] == ["conn-w1"]
    [refreshed] = event_tap.of_type(REFRESHED)
    assert refreshed["data"]["connectionId"] == "conn-w1"


def test_a_failing_invocation_is_reported_to_the_host_with_the_error(functions_worker, app_env, manager):
    delivery = ServiceBusDelivery(body=b'{"specversion": "1.0", "oops": true}', message_id="poison-w")
    result = functions_worker.invoke_service_bus("sync_refresh_handler", delivery)
    assert not result.succeeded
    assert "InvalidEventError" in result.error
    assert manager.calls == []


# The whole cycle ---------------------------------------------------------------------------------


def outcomes(events) -> dict[str, tuple]:
    """connectionId -> (outcome type, error code, retryable, attempts), from the published events."""
    found = {}
    for body, event_type in events:
        if event_type in (REFRESHED, REFRESH_FAILED):
            data = json.loads(body)["data"]
            error = data.get("error", {})
            found[data["connectionId"]] = (event_type, error.get("code"), data.get("retryable"), data.get("attempts"))
    return found


def test_a_whole_cycle_through_the_worker_ends_as_run_once_does(
    functions_worker, app_env, cosmos_database, cosmos_container, manager, tap, rabbitmq, caplog
):
    """Fire the timer, deliver every published event that triggers a function as a Service Bus
    message, redeliver failures up to the max delivery count: the same outcomes, calls and events as
    the local host's `run --once` over an identical fleet."""
    now = datetime.now(UTC)
    documents, due, rejected, flaky, dots = build_fleet(now, size=160, seed=11)

    def script(call):
        if call.connection_id in rejected:
            return Answer(400, {"error": "invalid_grant"})
        if call.connection_id in flaky:
            return Answer(503, {"message": "upstream down"})
        return Answer(200)

    for document in documents:
        cosmos_container.upsert_item(document)
    manager.container, manager.token_lifetime, manager.script = cosmos_container, timedelta(hours=2), script

    max_deliveries = int(app_env["TOKEN_REFRESH_MAX_DELIVERY_COUNT"])
    # The app publishes to RabbitMQ only here (no scheduled retries: a transient failure raises and the queue
    # redelivers); every published event that triggers a function is sent to the Service Bus model as the app's
    # Service Bus transport would send it, and the model's host delivers it through the worker.
    model = ServiceBusModel(queue_properties({REFRESH_REQUESTED: {"maxDeliveryCount": max_deliveries}}))
    host = FunctionsHostOnModel(functions_worker, model, ProcessorOptions.from_host_json(APP_ROOT / "host.json"))
    published: list[tuple[bytes, str]] = []

    def forward_published():
        for captured in tap.drain():
            body = json.dumps(captured.body).encode()
            published.append((body, captured.routing_key))
            if captured.routing_key in host.functions_by_queue:
                event, _ = parse_event(body, captured.routing_key)
                model.send(captured.routing_key, ModelMessage.of_sdk_message(service_bus_message(event)))

    host.feed = forward_published
    received = {name: functions_worker.record_arguments(name) for name in FUNCTIONS}
    poison = ModelMessage(body=b'{"specversion": "1.0", "oops": true}', message_id="poison-cycle")
    model.send(REFRESH_REQUESTED, poison)  # a message no app sent: retried, then dead-lettered
    with caplog.at_level(logging.WARNING):
        functions_worker.invoke_timer("check_expiring_timer").raise_for_failure()
        host.run_until_idle()

    # Each invocation got the trigger object of what was delivered, field by field.
    assert len(received["check_expiring_timer"]) == 1
    messages = [
        call["message"] for name in ("manager_check_handler", "sync_refresh_handler") for call in received[name]
    ]
    assert sorted(m.lock_token for m in messages) == sorted(i.delivery.lock_token for i in host.invocations)
    by_lock_token = {m.lock_token: m for m in messages}
    for invocation in host.invocations:
        sent, got = invocation.delivery, by_lock_token[invocation.delivery.lock_token]
        assert (got.get_body(), got.message_id, got.delivery_count, got.sequence_number) == (
            sent.message.body,
            sent.message.message_id,
            sent.delivery_count,
            sent.sequence_number,
        )
        assert (got.content_type, got.session_id, got.application_properties) == (
            sent.message.content_type,
            sent.message.session_id,
            sent.message.application_properties,
        )

    # Every due connection refreshed or failed with an event; nothing else touched.
    worker_outcomes = outcomes(published)
    assert set(worker_outcomes) == due | dots
    assert {c for c, o in worker_outcomes.items() if o[0] == REFRESHED} == due - rejected - flaky
    assert Counter(t for _, t in published)[CHECK_EXPIRING] == 1
    for body, event_type in published:
        envelope, _ = parse_event(body, event_type)  # each in the documented shape
        assert envelope.type == event_type
    calls = Counter(call.connection_id for call in manager.calls)
    assert set(calls) == due
    # Transient failures fail each delivery until the last one reports them; only the poison message
    # fails every delivery and is dead-lettered, after max_deliveries.
    failed = [i for i in host.invocations if i.settled == "abandoned"]
    assert {i.function_name for i in failed} <= {"sync_refresh_handler"}
    failed_deliveries = Counter(i.delivery.message.message_id for i in failed)
    assert failed_deliveries.pop("poison-cycle") == max_deliveries
    assert len(failed_deliveries) == len(flaky) and set(failed_deliveries.values()) <= {max_deliveries - 1}
    [dead] = model.dead_letters(REFRESH_REQUESTED)
    assert (dead.message.message_id, dead.delivery_count, dead.reason) == (
        "poison-cycle",
        max_deliveries,
        "MaxDeliveryCountExceeded",
    )
    [poison_error] = {i.result.error for i in host.invocations if i.delivery.message.message_id == "poison-cycle"}
    assert "InvalidEventError" in poison_error

    # The local host over an identical fleet: the same outcomes and the same calls.
    twin = cosmos_database.create_container(f"twin_{cosmos_container.id}", partition_key=PartitionKey("/tenantId"))
    try:
        for document in documents:
            twin.upsert_item(document)
        with StandInManager(script=script) as twin_manager:
            twin_manager.container, twin_manager.token_lifetime = twin, timedelta(hours=2)
            env = cli_environment(
                app_env
                | {
                    "COSMOS_CONNECTIONS_CONTAINER": twin.id,
                    "COSMOS_STATE_CONTAINER": f"{app_env['COSMOS_STATE_CONTAINER']}_twin",
                    "RABBITMQ_EXCHANGE": f"{app_env['RABBITMQ_EXCHANGE']}.twin",
                    "INTEGRATION_MANAGER_URL": twin_manager.url,
                }
            )
            twin_tap_exchange = env["RABBITMQ_EXCHANGE"]
            twin_tap = DurableTap(rabbitmq.url, twin_tap_exchange)
            try:
                result = run_cli(env, "run", "--once")
                assert result.returncode == 0, result.stderr[-3000:]
                local_host_events = [(json.dumps(c.body).encode(), c.routing_key) for c in twin_tap.drain()]
            finally:
                twin_tap.close()
            assert outcomes(local_host_events) == worker_outcomes
            assert Counter(call.connection_id for call in twin_manager.calls) == calls
    finally:
        cosmos_database.delete_container(twin.id)


# Application Insights through the worker ---------------------------------------------------------


# Each function and the module whose lines show it ran; the refresh first: the check after it requests nothing new.
TELEMETRY_PLAN = (
    ("sync_refresh_handler", "shared.token_refresh"),
    ("check_expiring_timer", "shared.check_timer"),
    ("manager_check_handler", "shared.expiring_check"),
)


def test_every_functions_logs_reach_application_insights_with_the_ids_and_the_invocations_operation(
    app_env, cosmos_container, manager, tmp_path
):
    """With PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true the worker configures the Azure Monitor
    distro; what its exporter sends for an invocation of each function must carry the ids as customDimensions
    and the host's trace context as the operation (tests/support/worker_telemetry.py)."""
    bodies = {
        "sync_refresh_handler": stored_connection_request(cosmos_container, "conn-otel").to_json().decode(),
        "manager_check_handler": check_event(timedelta(minutes=65)).to_json().decode(),
    }
    traces = {function: (uuid.uuid4().hex, uuid.uuid4().hex[:16]) for function, _ in TELEMETRY_PLAN}
    plan = [
        {"function": function, "traceparent": f"00-{traces[function][0]}-{traces[function][1]}-01"}
        | ({"body": bodies[function]} if function in bodies else {})
        for function, _ in TELEMETRY_PLAN
    ]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.worker_telemetry", str(plan_file)],
        cwd=APP_ROOT,
        env=cli_environment(app_env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["load_errors"] == {}
    invocations = {invocation["function"]: invocation for invocation in report["invocations"]}
    assert [invocation["error"] for invocation in invocations.values() if not invocation["succeeded"]] == []
    assert [call.connection_id for call in manager.calls] == ["conn-otel"]

    app_lines = [
        envelope
        for envelope in report["envelopes"]
        if envelope["data"]["baseType"] == "MessageData"
        and envelope["data"]["baseData"]["properties"].get("logger_name", "").startswith("shared.")
    ]
    # Every line the app logged belongs to one invocation: its ids and its operation.
    loggers = {function: set() for function in invocations}
    for envelope in app_lines:
        properties, message = envelope["data"]["baseData"]["properties"], envelope["data"]["baseData"]["message"]
        function = properties.get("functionName")
        assert function in invocations, message
        assert properties["invocationId"] == invocations[function]["invocation_id"], message
        assert (envelope["tags"]["ai.operation.id"], envelope["tags"]["ai.operation.parentId"]) == traces[function]
        loggers[function].add(properties["logger_name"])
    for function, module in TELEMETRY_PLAN:
        assert module in loggers[function], (function, loggers[function])

    [refreshed] = [
        line for line in app_lines if line["data"]["baseData"]["message"].startswith("OAuth tokens refreshed")
    ]
    assert refreshed["data"]["baseData"]["properties"] | {"logger_name": "-"} == {
        "connectionId": "conn-otel",
        "integrationId": "github",
        "tenantId": "t-9",
        "invocationId": invocations["sync_refresh_handler"]["invocation_id"],
        "functionName": "sync_refresh_handler",
        "logger_name": "-",
    }
    assert MANAGER_TOKEN not in json.dumps(report["envelopes"])
