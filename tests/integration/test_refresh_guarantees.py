"""Exactly one refresh and at least one outcome: scenarios that once broke the guarantees (issue #10),
each against the real Cosmos-compatible server, RabbitMQ and the stand-in manager. Faults are injected
at the servers (the Cosmos server's fault hook, the manager's script), never by mocking an SDK. The
scenarios that need the local host running as a program: tests/e2e/test_refresh_guarantees.py."""

import logging
import time
from datetime import timedelta

import pytest
from azure.cosmos.exceptions import CosmosHttpResponseError

import manager_check_handler
import sync_refresh_handler
from localdev.stand_in_manager import Answer
from shared import expiring_check, runtime
from shared.errors import InvalidEventError, RequestIdConflictError
from shared.events import (
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    REFRESHED,
    CloudEvent,
    RefreshRequestedData,
    make_event,
)
from shared.ids import connection_key, outcome_event_id
from shared.messaging import ServiceBusTransport
from shared.times import utc_now
from tests.support.cosmos_faults import CosmosFaults
from tests.support.documents import a_request_that_failed_transiently, request_for, seed_connection
from tests.support.helpers import check_event, invoke, trigger
from tests.support.service_bus import RecordingClient


@pytest.fixture
def cosmos_faults(cosmos_server):
    """The Cosmos server, able to fail chosen requests; every rule is removed after the test."""
    faults = CosmosFaults(cosmos_server)
    yield faults
    faults.clear_faults()


def header(call, name):
    return {key.lower(): value for key, value in call.headers.items()}.get(name.lower())


def test_a_failure_record_that_cannot_be_written_does_not_cost_the_failed_event(
    app_env, cosmos_faults, cosmos_container, manager, event_tap, caplog
):
    # Was: the write raised, the claim stayed in progress, and every redelivery skipped the request as
    # "another invocation is refreshing it": no refresh.failed, ever.
    request = request_for("c-1", seed_connection(cosmos_container))
    manager.script = lambda call: Answer(400, {"error": "invalid_grant"})
    cosmos_faults.inject_fault(
        method="POST", path=f"/colls/{app_env['COSMOS_STATE_CONTAINER']}/docs", partition_key="failure-", times=-1
    )
    with caplog.at_level(logging.WARNING):
        invoke(sync_refresh_handler, trigger(request, 1))
    [failed] = event_tap.of_type(REFRESH_FAILED)
    assert (failed["data"]["error"]["code"], failed["data"]["retryable"]) == ("invalid_grant", False)
    assert "Could not record the permanent failure" in caplog.text
    invoke(sync_refresh_handler, trigger(request, 2))  # a redelivery (lost completion): nothing again
    assert len(manager.calls) == 1
    assert event_tap.drain() == []


def test_a_connection_revoked_while_a_delivery_retries_is_not_called_again(
    app_env, cosmos_container, manager, event_tap, caplog
):
    # Was: the retry in the same delivery refreshed the revoked connection and published `refreshed`.
    request = request_for("c-1", seed_connection(cosmos_container))

    def revoke_then_fail(call):
        seed_connection(cosmos_container, status="revoked")  # revoked while the first call is in flight
        return Answer(503)

    manager.script = revoke_then_fail
    with caplog.at_level(logging.INFO):
        invoke(sync_refresh_handler, trigger(request, 1))  # ends: nothing left to retry
    assert len(manager.calls) == 1  # INTEGRATION_MANAGER_MAX_ATTEMPTS=2 would have called again
    assert event_tap.drain() == []
    assert "the connection is now 'revoked' (after 1 failed call(s))" in caplog.text
    invoke(sync_refresh_handler, trigger(request, 2))
    assert len(manager.calls) == 1


def test_a_connection_revoked_mid_retry_and_enabled_again_is_refreshed_by_the_next_check(
    app_env, cosmos_container, manager, event_tap
):
    # Was: the claim ended SKIPPED, and SKIPPED was final for the claim's lifetime (7 days): the re-enabled
    # connection, same token, was requested by every check and never called again.
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)

    def revoke_then_fail(call):
        seed_connection(cosmos_container, status="revoked", expires_in=expires_at - utc_now())
        return Answer(503)

    manager.script = revoke_then_fail
    invoke(sync_refresh_handler, trigger(request, 1))  # ends SKIPPED, no outcome
    assert event_tap.drain() == []
    seed_connection(cosmos_container, status="active", expires_in=expires_at - utc_now())  # enabled again
    manager.script = lambda call: Answer(200)
    manager.container = cosmos_container
    invoke(manager_check_handler, trigger(check_event()))
    [again] = [e for e in event_tap.drain() if e.routing_key == REFRESH_REQUESTED]
    assert again.body["id"] == request.id  # the same token: the same request, in a new round
    invoke(sync_refresh_handler, trigger(CloudEvent.model_validate(again.body), 1))
    assert len(manager.calls) == 2
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


def test_a_refresh_done_by_a_call_that_failed_is_not_done_again(app_env, cosmos_container, manager, event_tap):
    # A gateway answers 504 after integration-manager refreshed: the retry looks before calling again.
    request = request_for("c-1", seed_connection(cosmos_container))
    manager.container, manager.token_lifetime = cosmos_container, timedelta(hours=2)
    answers = iter([Answer(504, refresh_anyway=True), Answer(200)])
    manager.script = lambda call: next(answers)
    invoke(sync_refresh_handler, trigger(request, 1))
    assert len(manager.calls) == 1 and manager.calls[0].refreshed
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


def test_a_request_carrying_another_connections_id_is_rejected_and_the_real_one_still_refreshes(
    app_env, cosmos_container, manager, event_tap
):
    # Was: B was refreshed under A's claim, then A's own request was "already handled": 0 calls for A.
    a = request_for("conn-a", seed_connection(cosmos_container, "conn-a"))
    b = request_for("conn-b", seed_connection(cosmos_container, "conn-b"))
    forged = b.model_copy(update={"id": a.id})
    with pytest.raises(InvalidEventError, match="request id does not match its connection and expiresAt"):
        invoke(sync_refresh_handler, trigger(forged))
    assert manager.calls == []
    invoke(sync_refresh_handler, trigger(a))
    assert [call.connection_id for call in manager.calls] == ["conn-a"]
    assert [e.body["data"]["connectionId"] for e in event_tap.drain()] == ["conn-a"]


def test_a_claim_is_bound_to_the_connection_that_first_used_its_id(app_env, cosmos_container, manager, event_tap):
    # A request without expiry is identified by its document version, which its message does not carry:
    # the claim binds the id to the connection instead.
    seed_connection(cosmos_container, "conn-b")
    a_id = request_for("conn-a", seed_connection(cosmos_container, "conn-a")).id
    runtime.state_store().claims.acquire(a_id, connection_key("t-1", "zoom", "conn-a"), int(time.time() * 1000), 1000)
    data = RefreshRequestedData(connection_id="conn-b", integration_id="zoom", tenant_id="t-1", requested_at=utc_now())
    with pytest.raises(RequestIdConflictError, match="first used for another connection"):
        invoke(sync_refresh_handler, trigger(make_event(data, event_id=a_id), 2))
    assert manager.calls == []


def test_every_call_of_a_request_carries_its_id_as_idempotency_key_and_a_new_round_a_new_key(
    app_env, cosmos_container, manager, event_tap
):
    request, expires_at, first_failure = a_request_that_failed_transiently(cosmos_container, manager, event_tap)
    assert {header(call, "Idempotency-Key") for call in manager.calls} == {request.id}
    assert len(manager.calls) == 6

    # A later check asks again (same connection and expiry, so the same request id): a new round of
    # attempts, with a key of its own, and outcome ids of its own.
    manager.script = lambda call: Answer(200)
    invoke(sync_refresh_handler, trigger(request_for("c-1", expires_at), 1))
    assert header(manager.calls[-1], "Idempotency-Key") == f"{request.id}.1"
    [refreshed] = event_tap.of_type(REFRESHED)
    assert first_failure["id"] == outcome_event_id(request.id, 0, REFRESH_FAILED)
    assert refreshed["id"] == outcome_event_id(request.id, 1, REFRESHED)


def test_an_outcome_published_again_keeps_its_id(app_env, cosmos_container, manager, event_tap):
    # Was: a redelivery finishing a killed invocation's story published `refreshed` with a new id, so a
    # consumer de-duplicating on ids (as the docs tell it to) counted two refreshes.
    expires_at = seed_connection(cosmos_container)
    request = request_for("c-1", expires_at)
    key = connection_key("t-1", "zoom", "c-1")
    assert runtime.state_store().claims.acquire(request.id, key, int(time.time() * 1000), 600_000).status == "acquired"
    seed_connection(cosmos_container, expires_in=timedelta(hours=1))  # the killed invocation had refreshed
    invoke(sync_refresh_handler, trigger(request, 2))
    [republished] = event_tap.of_type(REFRESHED)
    assert republished["id"] == outcome_event_id(request.id, 0, REFRESHED)

    other = request_for("c-2", seed_connection(cosmos_container, "c-2"))
    invoke(sync_refresh_handler, trigger(other, 1))  # the ordinary way, for comparison
    [published] = event_tap.of_type(REFRESHED)
    assert published["id"] == outcome_event_id(other.id, 0, REFRESHED)
    assert manager.calls and all(header(call, "Idempotency-Key") == other.id for call in manager.calls)


def test_a_redelivery_meeting_its_own_live_claim_takes_over_once_the_earlier_calls_are_over(
    app_env, cosmos_container, manager, event_tap
):
    # Was: the redelivery found the claim of its own earlier delivery (killed mid-call, or its broker
    # connection lost) within the lease, logged "another invocation is refreshing it" and completed:
    # 0 calls, 0 outcome events for ~10 minutes, and the next check's requests were skipped the same way.
    request = request_for("c-1", seed_connection(cosmos_container))
    key = connection_key("t-1", "zoom", "c-1")
    now_ms = int(time.time() * 1000)
    held = runtime.state_store().claims.acquire(
        request.id, key, now_ms, 600_000, holder={"messageId": request.id, "delivery": 1}, calls_window_ms=1500
    )
    assert held.status == "acquired"

    invoke(sync_refresh_handler, trigger(request, 1, message_id="a-duplicate"))  # another message: left alone
    assert manager.calls == []

    called_at = []
    manager.script = lambda call: called_at.append(time.time() * 1000) or Answer(200)
    invoke(sync_refresh_handler, trigger(request, 2))  # the same message again: the earlier delivery is over
    assert len(manager.calls) == 1
    assert called_at[0] >= now_ms + 1500  # not before the earlier delivery's calls could be over
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]
    invoke(sync_refresh_handler, trigger(request, 3))  # and only once
    assert len(manager.calls) == 1 and event_tap.drain() == []


def test_no_new_call_while_an_earlier_one_may_still_be_in_flight(app_env, cosmos_container, manager, event_tap):
    # Was: a call that timed out was repeated at once, while integration-manager was still working on
    # it: overlapping refreshes of one token (with rotating refresh tokens, a revoked token family).
    request = request_for("c-1", seed_connection(cosmos_container))
    manager.container, manager.token_lifetime = cosmos_container, timedelta(hours=2)
    in_flight = {"until": 0.0}

    def slow_then_fast(call):
        if len(manager.calls) == 1:
            in_flight["until"] = time.monotonic() + 1.0
            return Answer(504, delay_s=1.0)  # the gateway gives up after the app did; nothing refreshed
        return Answer(200)

    manager.script = slow_then_fast
    invoke(sync_refresh_handler, trigger(request, 1))
    first, second = manager.calls
    assert second.received_at >= in_flight["until"]  # INTEGRATION_MANAGER_IN_FLIGHT_MS=2000 after giving up
    assert second.received_at - first.received_at >= 2.0
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]


def test_in_azure_a_transient_failure_is_retried_by_a_scheduled_message_and_the_delivery_completes(
    app_env, cosmos_container, manager, event_tap
):
    # The Service Bus transport (at the SDK boundary) schedules the retry; the failed delivery
    # completes instead of being redelivered at once.
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    request = request_for("c-1", seed_connection(cosmos_container))
    answers = iter([Answer(503), Answer(503), Answer(200)])
    manager.script = lambda call: next(answers)
    before = utc_now()
    invoke(sync_refresh_handler, trigger(request, 1))  # no exception: nothing to redeliver
    [(retry, at)] = client.senders[REFRESH_REQUESTED].scheduled
    assert retry.message_id == f"{request.id}.retry-0.1"
    assert before + timedelta(milliseconds=50) <= at <= utc_now() + timedelta(milliseconds=50)  # the delay
    assert event_tap.drain() == []

    body = b"".join(retry.body)
    invoke(sync_refresh_handler, trigger(body, 1, message_id=retry.message_id))  # delivered at `at`
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]
    assert len(manager.calls) == 3


# A Cosmos outage (issue #21): scheduled retries, as for integration-manager's failures ----------------------------


def test_a_cosmos_outage_during_a_refresh_is_retried_by_scheduled_messages_not_dead_lettered(
    app_env, cosmos_faults, cosmos_container, manager, event_tap, caplog
):
    # The queue redelivers a raising message within about a second: 10 deliveries were used up by a 15-s outage.
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    request = request_for("c-1", seed_connection(cosmos_container))
    cosmos_faults.inject_fault(method="POST", path=f"/colls/{cosmos_container.id}/docs", status=503, times=-1)
    with caplog.at_level(logging.WARNING):
        invoke(sync_refresh_handler, trigger(request, 1))  # no exception: nothing for the queue to redeliver
    [(first, _)] = client.senders[REFRESH_REQUESTED].scheduled
    assert first.message_id == f"{request.id}.retry-0.1"
    assert "Cosmos DB failed" in caplog.text and "COSMOS_ENDPOINT" in caplog.text
    # Still failing: the copy schedules the next retry, later (the delay doubles), with a new MessageId.
    started = utc_now()
    invoke(sync_refresh_handler, trigger(b"".join(first.body), 1, message_id=first.message_id))
    [_, (second, second_at)] = client.senders[REFRESH_REQUESTED].scheduled
    assert second.message_id == f"{request.id}.retry-0.2"
    assert second_at >= started + timedelta(milliseconds=100)  # TOKEN_REFRESH_RETRY_DELAY_MS=50, doubled
    assert manager.calls == [] and event_tap.drain() == []
    cosmos_faults.clear_faults()  # the outage is over
    invoke(sync_refresh_handler, trigger(b"".join(second.body), 1, message_id=second.message_id))
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]
    assert len(manager.calls) == 1


def test_a_cosmos_outage_that_outlasts_the_retries_is_raised_for_the_queue_to_dead_letter(
    app_env, cosmos_faults, cosmos_container, manager, event_tap
):
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    request = request_for("c-1", seed_connection(cosmos_container))
    cosmos_faults.inject_fault(method="POST", path=f"/colls/{cosmos_container.id}/docs", status=503, times=-1)
    last = f"{request.id}.retry-0.2"  # TOKEN_REFRESH_MAX_DELIVERY_COUNT=3: the 3rd delivery is the last
    with pytest.raises(CosmosHttpResponseError):
        invoke(sync_refresh_handler, trigger(request.to_json(), 1, message_id=last))
    assert REFRESH_REQUESTED not in client.senders or client.senders[REFRESH_REQUESTED].scheduled == []


def test_a_cosmos_outage_after_the_claim_sends_a_copy_that_takes_it_over_without_calling_again(
    app_env, cosmos_faults, cosmos_container, manager, event_tap, monkeypatch
):
    # A short calls window (retry budget 5 s + timeouts + in-flight 2 s), so the copy comes in seconds.
    monkeypatch.setenv("INTEGRATION_MANAGER_TIMEOUT_MS", "1000")
    monkeypatch.setenv("INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS", "500")
    runtime.reset()
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    manager.container = cosmos_container  # it refreshes the document, as the real manager does
    request = request_for("c-1", seed_connection(cosmos_container))
    # The claim is created (a POST), then every write of it (an etag-guarded PUT) fails: it stays in progress, held by
    # its lease.
    cosmos_faults.inject_fault(
        method="PUT", path=f"/colls/{app_env['COSMOS_STATE_CONTAINER']}/docs/claim-[^/]+/?$", times=-1
    )
    started = utc_now()
    invoke(sync_refresh_handler, trigger(request, 1))
    # The outcome is recorded before it is published: a claim that cannot be written publishes nothing yet.
    assert event_tap.drain() == []
    [(copy, at)] = client.senders[REFRESH_REQUESTED].scheduled
    # Not before this delivery's calls are surely over (its calls window, 8.5 s), long before the lease (10 min) ends.
    assert started + timedelta(seconds=8) <= at <= started + timedelta(seconds=15)
    cosmos_faults.clear_faults()
    time.sleep(max(0.0, (at - utc_now()).total_seconds()))
    # A different MessageId, and delivery 1: it takes the claim over as the successor of the delivery that held it.
    invoke(sync_refresh_handler, trigger(b"".join(copy.body), 1, message_id=copy.message_id))
    assert len(manager.calls) == 1  # it looked first: the token was refreshed
    [again] = event_tap.of_type(REFRESHED)
    assert again["data"]["connectionId"] == "c-1"


def test_a_cosmos_outage_during_the_check_is_waited_out_and_the_check_completes(
    app_env, cosmos_faults, cosmos_container, manager, event_tap, caplog
):
    seed_connection(cosmos_container)
    # More failures than the SDK retries on its own (a few): the check itself sees the outage.
    cosmos_faults.inject_fault(method="POST", path=f"/colls/{cosmos_container.id}/docs", status=500, times=8)
    with caplog.at_level(logging.WARNING):
        invoke(manager_check_handler, trigger(check_event()))  # no exception: nothing for the queue to redeliver
    assert [e["data"]["connectionId"] for e in event_tap.of_type(REFRESH_REQUESTED)] == ["c-1"]
    assert "Cosmos DB failed during the check" in caplog.text and "COSMOS_ENDPOINT" in caplog.text


def test_a_cosmos_outage_that_outlasts_the_checks_wait_is_raised_for_the_queue_to_redeliver(
    app_env, cosmos_faults, cosmos_container, manager, event_tap, monkeypatch
):
    monkeypatch.setattr(expiring_check, "CHECK_STORE_RETRY_BUDGET_S", 1.5)
    seed_connection(cosmos_container)
    cosmos_faults.inject_fault(method="POST", path=f"/colls/{cosmos_container.id}/docs", status=503, times=-1)
    with pytest.raises(CosmosHttpResponseError):
        invoke(manager_check_handler, trigger(check_event()))
    assert event_tap.drain() == []


def test_a_new_process_whose_first_refresh_meets_a_cosmos_outage_schedules_a_copy(
    app_env, cosmos_faults, cosmos_container, manager, event_tap
):
    # A host started (or restarted) during an outage creates its clients, and the state container, on its first
    # invocation: that failed before the refresh began, was redelivered at once and dead-lettered within 20 s.
    runtime.reset()
    client = RecordingClient()
    runtime.use_retry_scheduler(ServiceBusTransport(client))
    request = request_for("c-1", seed_connection(cosmos_container))
    cosmos_faults.inject_fault(path="/colls", status=500, times=-1)  # every request to a container
    invoke(sync_refresh_handler, trigger(request, 1))  # no exception: nothing for the queue to redeliver
    [(copy, _)] = client.senders[REFRESH_REQUESTED].scheduled
    assert copy.message_id == f"{request.id}.retry-0.1"
    cosmos_faults.clear_faults()
    invoke(sync_refresh_handler, trigger(b"".join(copy.body), 1, message_id=copy.message_id))
    assert [e.routing_key for e in event_tap.drain()] == [REFRESHED]
