"""The app's Service Bus path as Azure runs it: the functions in the real Functions worker, the app sending through
its own ServiceBusTransport, and the Service Bus model (localdev/service_bus_model.py) doing what the broker does --
duplicate detection over the history window, scheduled messages, peek-lock with lock renewal and delivery counts,
the max delivery count -- with the queue properties scripts/deploy.sh creates (localdev/service_bus_queues.json).

Each scenario ends with the guarantee a user cares about: every expiring connection refreshed exactly once, or one
outcome event. The recheck scenarios (a fault of ours fixed before the next check; an outage longer than the
scheduled retries) failed before request MessageIds carried their attempt round: duplicate detection dropped every
re-request for the whole window (docs/failure-handling.md, "What the app relies on from Service Bus").
"""

from collections import Counter
from datetime import timedelta

import pytest

from localdev.service_bus_model import ProcessorOptions, ServiceBusModel, queue_properties
from localdev.stand_in_manager import Answer
from shared import check_timer
from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED
from shared.manager_client import IntegrationManagerClient
from shared.times import utc_now
from tests.support.documents import seed_expiring
from tests.support.helpers import APP_ROOT
from tests.support.service_bus import CONNECTION_STRING
from tests.support.service_bus_host import FunctionsHostOnModel, HostKilled, ModelClient

FLEET = 6


class AzurePath:
    """The model, the host over the worker, and what the platform saw (the RabbitMQ bridge's events)."""

    def __init__(self, model, host, tap):
        self.model, self.host, self.tap = model, host, tap
        self.events: list[tuple[str, dict]] = []

    def run(self, timeout_s: float = 60.0) -> None:
        self.host.run_until_idle(timeout_s)
        self.events.extend((e.routing_key, e.body) for e in self.tap.drain())

    def next_check(self, monkeypatch) -> None:
        """The timer's next run (a new process's cadence: the check is due)."""
        monkeypatch.setattr(check_timer, "cadence", check_timer.CheckCadence())
        self.host.fire_timer()

    def outcomes(self, event_type: str) -> Counter:
        return Counter(body["data"]["connectionId"] for kind, body in self.events if kind == event_type)


def model_for(app_env, **refresh_queue) -> ServiceBusModel:
    overrides = {"maxDeliveryCount": int(app_env["TOKEN_REFRESH_MAX_DELIVERY_COUNT"])} | refresh_queue
    return ServiceBusModel(queue_properties({REFRESH_REQUESTED: overrides}))


@pytest.fixture
def azure(functions_worker, app_env, monkeypatch, tap):
    """Service Bus configured for the app (and the RabbitMQ bridge, as deployed), on the model."""
    return make_azure(functions_worker, app_env, monkeypatch, tap, model_for(app_env))


def make_azure(functions_worker, app_env, monkeypatch, tap, model, options=None):
    client = ModelClient(model)
    monkeypatch.setenv("ServiceBusConnection", CONNECTION_STRING)
    monkeypatch.setattr("shared.messaging.service_bus.service_bus_client", lambda settings: client)
    host = FunctionsHostOnModel(
        functions_worker, model, options or ProcessorOptions.from_host_json(APP_ROOT / "host.json")
    )
    return AzurePath(model, host, tap)


def seed_fleet(container, size: int = FLEET) -> set[str]:
    now = utc_now()
    ids = {f"conn-{n}" for n in range(size)}
    for n, connection_id in enumerate(sorted(ids)):
        seed_expiring(container, connection_id, now + timedelta(minutes=10 + n))
    return ids


def serve(manager, container) -> None:
    """The stand-in manager refreshes in Cosmos, with 2-hour tokens: beyond the next check's threshold."""
    manager.container, manager.token_lifetime = container, timedelta(hours=2)


# The whole cycle -----------------------------------------------------------------------------------------------


def test_a_whole_cycle_on_the_service_bus_model_refreshes_every_due_connection_once(azure, cosmos_container, manager):
    due = seed_fleet(cosmos_container)
    serve(manager, cosmos_container)
    azure.host.fire_timer()
    azure.run()
    assert azure.outcomes(REFRESHED) == Counter(due)
    assert Counter(call.connection_id for call in manager.calls) == Counter(due)
    # The check and each request went through the broker once, and the outcomes reached Service Bus consumers.
    assert [i.settled for i in azure.host.handled("manager_check_handler")] == ["completed"]
    assert sorted(i.settled for i in azure.host.handled("sync_refresh_handler")) == ["completed"] * len(due)
    assert azure.model.active_count(REFRESHED) == len(due)
    assert azure.model.dead_letters(REFRESH_REQUESTED) == []


# Re-requests after a request ended retryable --------------------------------------------------------------------


def test_a_fault_of_ours_fixed_before_the_next_check_recovers_every_connection_exactly_once(
    azure, cosmos_container, manager, monkeypatch
):
    # integration-manager rejects our credential: every request ends refresh.failed, retryable, not recorded.
    due = seed_fleet(cosmos_container)
    serve(manager, cosmos_container)
    manager.script = lambda call: Answer(401, {"message": "bad token"})
    azure.host.fire_timer()
    azure.run()
    assert azure.outcomes(REFRESH_FAILED) == Counter(due)
    assert all(body["data"]["retryable"] for kind, body in azure.events if kind == REFRESH_FAILED)

    # The credential is fixed; the next check asks again. Before request MessageIds carried their round, duplicate
    # detection (PT2H) silently dropped all of these: 0 refreshed.
    manager.script = None
    calls_before = len(manager.calls)
    azure.next_check(monkeypatch)
    azure.run()
    assert azure.outcomes(REFRESHED) == Counter(due)
    assert Counter(call.connection_id for call in manager.calls[calls_before:]) == Counter(due)
    assert azure.model.dropped_duplicates(REFRESH_REQUESTED) == []


def test_an_outage_longer_than_the_scheduled_retries_recovers_on_the_next_check(
    azure, cosmos_container, manager, monkeypatch
):
    due = seed_fleet(cosmos_container, 3)
    serve(manager, cosmos_container)
    manager.script = lambda call: Answer(503)
    azure.host.fire_timer()
    azure.run()
    # Every delivery used up (TOKEN_REFRESH_MAX_DELIVERY_COUNT=3: the request and two scheduled retries).
    assert azure.outcomes(REFRESH_FAILED) == Counter(due)
    retries = [i.delivery.message.message_id for i in azure.host.handled("sync_refresh_handler")]
    assert sum(".retry-0." in message_id for message_id in retries) == 2 * len(due)

    manager.script = None
    calls_before = len(manager.calls)
    azure.next_check(monkeypatch)
    azure.run()
    assert azure.outcomes(REFRESHED) == Counter(due)
    assert Counter(call.connection_id for call in manager.calls[calls_before:]) == Counter(due)
    second_round = {i.delivery.message.message_id for i in azure.host.handled("sync_refresh_handler")[-len(due) :]}
    assert all(message_id.endswith(".round-1") for message_id in second_round)


def test_a_request_that_fails_again_after_a_recheck_gets_a_third_round(azure, cosmos_container, manager, monkeypatch):
    [connection] = seed_fleet(cosmos_container, 1)
    serve(manager, cosmos_container)
    manager.script = lambda call: Answer(401)
    for _ in range(2):  # two checks, both rejected
        azure.next_check(monkeypatch)
        azure.run()
    assert azure.outcomes(REFRESH_FAILED) == Counter({connection: 2})
    manager.script = None
    azure.next_check(monkeypatch)
    azure.run()
    assert azure.outcomes(REFRESHED) == Counter({connection: 1})
    ids = [i.delivery.message.message_id for i in azure.host.handled("sync_refresh_handler")]
    assert [message_id.rsplit(".", 1)[-1] for message_id in ids[1:]] == ["round-1", "round-2"]


# True duplicates are still absorbed ---------------------------------------------------------------------------


def test_overlapping_checks_are_absorbed_by_duplicate_detection(azure, cosmos_container, manager, monkeypatch):
    due = seed_fleet(cosmos_container)
    serve(manager, cosmos_container)
    azure.host.pause(REFRESH_REQUESTED)  # a second check before the first one's requests were handled
    azure.host.fire_timer()
    azure.next_check(monkeypatch)
    azure.run()
    azure.host.resume(REFRESH_REQUESTED)
    azure.run()
    assert len(azure.host.handled("manager_check_handler")) == 2
    assert Counter(call.connection_id for call in manager.calls) == Counter(due)
    assert azure.outcomes(REFRESHED) == Counter(due)
    assert Counter(m.message_id for m in azure.model.dropped_duplicates(REFRESH_REQUESTED)) == Counter(
        {i.delivery.message.message_id: 1 for i in azure.host.handled("sync_refresh_handler")}
    )


def test_a_check_re_run_after_its_host_died_sends_the_same_requests_which_are_dropped(
    functions_worker, app_env, monkeypatch, tap, cosmos_container, manager
):
    # The check ran and published, then its host died before completing the message: the lock runs out and the
    # check runs again from the start (DeliveryCount 2), re-sending every request with the same MessageIds.
    model = ServiceBusModel(
        queue_properties({CHECK_EXPIRING: {"lockDuration": "PT1S"}, REFRESH_REQUESTED: {"maxDeliveryCount": 3}})
    )
    azure = make_azure(functions_worker, app_env, monkeypatch, tap, model)
    due = seed_fleet(cosmos_container)
    serve(manager, cosmos_container)
    azure.host.kill(lambda function, delivery: function == "manager_check_handler", after_return=True)
    azure.host.pause(REFRESH_REQUESTED)  # the requests still wait when the check runs again
    azure.host.fire_timer()
    azure.run()
    azure.host.resume(REFRESH_REQUESTED)
    azure.run()
    checks = azure.host.handled("manager_check_handler")
    assert [(i.delivery.delivery_count, i.settled) for i in checks] == [(1, "killed"), (2, "completed")]
    assert len(azure.model.dropped_duplicates(REFRESH_REQUESTED)) == len(due)
    assert Counter(call.connection_id for call in manager.calls) == Counter(due)
    assert azure.outcomes(REFRESHED) == Counter(due)


def test_a_scheduled_retry_that_meets_a_new_checks_request_refreshes_once(
    functions_worker, app_env, monkeypatch, tap, cosmos_container, manager
):
    monkeypatch.setenv("TOKEN_REFRESH_RETRY_DELAY_MS", "3000")  # room for the next check on a loaded machine
    azure = make_azure(functions_worker, app_env, monkeypatch, tap, model_for(app_env))
    [connection] = seed_fleet(cosmos_container, 1)
    serve(manager, cosmos_container)
    answers = iter([Answer(503), Answer(503)])
    manager.script = lambda call: next(answers, Answer(200))
    azure.host.fire_timer()
    azure.host.run_until_idle(horizon_s=0)  # the first delivery failed; its retry is scheduled 3 s later
    assert azure.model.scheduled_count(REFRESH_REQUESTED) == 1
    azure.next_check(monkeypatch)  # meanwhile a new check asks for the same token: the same round, a duplicate
    azure.run()
    assert azure.outcomes(REFRESHED) == Counter({connection: 1})
    assert [call.connection_id for call in manager.calls].count(connection) == 3  # 2 failed + 1 on the retry
    [dropped] = azure.model.dropped_duplicates(REFRESH_REQUESTED)
    assert ".retry-" not in dropped.message_id


# Locks and hosts ---------------------------------------------------------------------------------------------


def short_calls_window(monkeypatch, read_timeout_ms: int) -> None:
    """Seconds, not minutes, until a delivery's calls can no longer run (a redelivery waits that long to take over)."""
    for name, value in {
        "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": 500,
        "INTEGRATION_MANAGER_TIMEOUT_MS": read_timeout_ms,
        "INTEGRATION_MANAGER_RETRY_BUDGET_MS": 1000,
        "INTEGRATION_MANAGER_IN_FLIGHT_MS": 500,
    }.items():
        monkeypatch.setenv(name, str(value))


def test_a_lock_lost_mid_refresh_redelivers_while_the_first_invocation_runs_and_nothing_is_called_twice(
    functions_worker, app_env, monkeypatch, tap, cosmos_container, manager
):
    # A 1 s lock renewed for at most 1 s, a 3 s call: the lock runs out mid-call and Service Bus delivers the
    # message again (DeliveryCount 2) while the first invocation still waits for integration-manager.
    short_calls_window(monkeypatch, read_timeout_ms=5000)
    model = model_for(app_env, lockDuration="PT1S")
    options = ProcessorOptions.from_host_json(APP_ROOT / "host.json")
    options = type(options)(**{**options.__dict__, "max_auto_lock_renewal_duration": timedelta(seconds=1)})
    azure = make_azure(functions_worker, app_env, monkeypatch, tap, model, options)
    [connection] = seed_fleet(cosmos_container, 1)
    serve(manager, cosmos_container)
    delays = iter([3.0])
    manager.script = lambda call: Answer(200, delay_s=next(delays, 0.0))
    azure.host.fire_timer()
    azure.run()
    deliveries = azure.host.handled("sync_refresh_handler")
    assert [i.delivery.delivery_count for i in deliveries] == [1, 2]
    assert deliveries[1].started < deliveries[0].ended  # redelivered while the first invocation ran
    assert deliveries[0].settled == "lock lost" and deliveries[1].settled == "completed"
    assert [call.connection_id for call in manager.calls] == [connection]
    # The redelivery saw the token refreshed (the manager wrote it before answering) and reported it without a
    # call; the slow first invocation reported too. At-least-once: the same event id, which consumers de-duplicate.
    refreshed = [body for kind, body in azure.events if kind == REFRESHED]
    assert {body["data"]["connectionId"] for body in refreshed} == {connection}
    assert len({body["id"] for body in refreshed}) == 1


def test_a_redelivery_after_the_host_was_killed_mid_refresh_reports_without_calling_again(
    functions_worker, app_env, monkeypatch, tap, cosmos_container, manager
):
    # The host dies right after integration-manager refreshed the token: no outcome, the claim still held. The lock
    # runs out (no host renews it) and the message comes back with DeliveryCount 2 to another instance.
    short_calls_window(monkeypatch, read_timeout_ms=1000)
    azure = make_azure(functions_worker, app_env, monkeypatch, tap, model_for(app_env, lockDuration="PT1S"))
    [connection] = seed_fleet(cosmos_container, 1)
    serve(manager, cosmos_container)
    real_refresh = IntegrationManagerClient.refresh_connection
    kills = iter([True])

    def refresh_then_die(self, *args, **kwargs):
        outcome = real_refresh(self, *args, **kwargs)
        if next(kills, False):
            raise HostKilled  # the process is gone: nothing after the call runs
        return outcome

    monkeypatch.setattr(IntegrationManagerClient, "refresh_connection", refresh_then_die)
    azure.host.fire_timer()
    azure.run()
    deliveries = azure.host.handled("sync_refresh_handler")
    assert [(i.delivery.delivery_count, i.settled) for i in deliveries] == [(1, "killed"), (2, "completed")]
    assert [call.connection_id for call in manager.calls] == [connection]
    [refreshed] = [body for kind, body in azure.events if kind == REFRESHED]
    assert refreshed["data"]["connectionId"] == connection


# Expiries in every stored form -------------------------------------------------------------------------------


def test_expiries_in_every_stored_form_and_precision_are_refreshed_once(azure, cosmos_container, manager):
    # Was: the five with more than millisecond precision were requested, then skipped as "refreshed since the
    # request" at every check (0 calls, 0 events); epoch seconds were read as 1970.
    soon = utc_now().replace(microsecond=123456) + timedelta(minutes=10)
    forms = {
        "dotnet-7-digits": soon.strftime("%Y-%m-%dT%H:%M:%S.%f") + "7Z",
        "python-6-digits": soon.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "python-isoformat": soon.isoformat(),
        "four-digits": soon.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-2] + "Z",
        "lower-case-t-z": soon.strftime("%Y-%m-%dt%H:%M:%S.%fz"),
        "epoch-ms-fraction": soon.timestamp() * 1000,
        "epoch-seconds": int(soon.timestamp()),
        "milliseconds-control": soon.isoformat(timespec="milliseconds"),
    }
    for connection_id, expires_at in forms.items():
        seed_expiring(cosmos_container, connection_id, soon)
        document = cosmos_container.read_item(connection_id, partition_key="t-1")
        document["oauth"]["expiresAt"] = expires_at
        cosmos_container.upsert_item(document)
    serve(manager, cosmos_container)
    azure.host.fire_timer()
    azure.run()
    assert Counter(call.connection_id for call in manager.calls) == Counter(forms.keys())
    assert azure.outcomes(REFRESHED) == Counter(forms.keys())
