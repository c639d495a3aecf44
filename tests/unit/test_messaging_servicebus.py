"""Service Bus adapter at the SDK boundary: no broker can run here, so the SDK's real client, message
and batch types are used and only the network send is replaced by a recorder."""

import json
import threading
from datetime import timedelta

import pytest
from azure.identity import DefaultAzureCredential
from azure.servicebus import ServiceBusClient

from shared.errors import PublishError, SettingsError
from shared.events import (
    CHECK_EXPIRING,
    CONTENT_TYPE,
    REFRESH_REQUESTED,
    CheckExpiringData,
    RefreshRequestedData,
    make_event,
)
from shared.messaging import EventPublisher, ServiceBusTransport, publisher_from_settings
from shared.settings import load_settings
from shared.times import format_time, utc_now
from tests.support.helpers import numbered_refresh_request
from tests.support.service_bus import CONNECTION_STRING, RecordingClient


def test_events_go_to_the_queue_named_after_their_type_with_contract_properties():
    client = RecordingClient()
    transport = ServiceBusTransport(client)
    check = make_event(CheckExpiringData(timestamp=utc_now(), threshold_time=utc_now()))
    transport.send([check, numbered_refresh_request(1)])

    assert set(client.senders) == {CHECK_EXPIRING, REFRESH_REQUESTED}
    [[message]] = client.senders[REFRESH_REQUESTED].sent_batches
    assert message.message_id == "id-1"
    assert message.content_type == CONTENT_TYPE
    assert message.application_properties == {"type": REFRESH_REQUESTED}
    assert json.loads(b"".join(message.body))["data"]["connectionId"] == "conn-1"


def test_many_events_are_sent_in_batches_that_fit_the_size_limit():
    client = RecordingClient(max_batch_bytes=4096)
    ServiceBusTransport(client).send([numbered_refresh_request(n) for n in range(100)])
    batches = client.senders[REFRESH_REQUESTED].sent_batches
    assert len(batches) > 1
    sent_ids = [message.message_id for batch in batches for message in batch]
    assert sent_ids == [f"id-{n}" for n in range(100)]  # all, in order, each once


def test_one_sender_per_queue_is_reused_and_sends_never_overlap():
    client = RecordingClient()
    transport = ServiceBusTransport(client)
    threads = [
        threading.Thread(
            target=lambda k=k: [transport.send([numbered_refresh_request(k * 100 + n)]) for n in range(50)]
        )
        for k in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sender = client.senders[REFRESH_REQUESTED]
    assert len(client.senders) == 1
    assert sum(len(batch) for batch in sender.sent_batches) == 400
    assert not sender.overlapped


def test_connection_string_builds_a_key_based_client_without_connecting():
    transport = ServiceBusTransport.from_settings(load_settings({"ServiceBusConnection": CONNECTION_STRING}))
    assert isinstance(transport._client, ServiceBusClient)
    assert transport._client.fully_qualified_namespace == "example-ns.servicebus.windows.net"
    assert not isinstance(transport._client._credential, DefaultAzureCredential)


def test_namespace_builds_an_identity_based_client():
    transport = ServiceBusTransport.from_settings(
        load_settings({"ServiceBusConnection__fullyQualifiedNamespace": "example-ns.servicebus.windows.net"})
    )
    assert transport._client.fully_qualified_namespace == "example-ns.servicebus.windows.net"
    assert isinstance(transport._client._credential, DefaultAzureCredential)


def test_publisher_needs_at_least_one_transport():
    with pytest.raises(SettingsError, match="No event transport"):
        publisher_from_settings(load_settings({}))


def test_both_configured_means_both_transports():
    publisher = publisher_from_settings(
        load_settings({"ServiceBusConnection": CONNECTION_STRING, "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/"})
    )
    assert [transport.name for transport in publisher.transports] == ["service-bus", "rabbitmq"]


class FailingTransport:
    name = "broken"

    def send(self, events):
        raise ConnectionError("broker down")

    def close(self):
        pass


def test_a_failing_transport_does_not_starve_the_other_and_the_publish_fails():
    client = RecordingClient()
    publisher = EventPublisher([FailingTransport(), ServiceBusTransport(client)])
    with pytest.raises(PublishError, match="broken: ConnectionError"):
        publisher.publish([numbered_refresh_request(1)])
    assert len(client.senders[REFRESH_REQUESTED].sent_batches) == 1


class SlowFirstSendClient(RecordingClient):
    """The first network send waits until `waiting` other sends are queued for the same queue."""

    def __init__(self, transport_ref, waiting, fail=False):
        super().__init__()
        self.transport_ref, self.waiting, self.fail, self.sends = transport_ref, waiting, fail, 0

    def get_queue_sender(self, queue):
        sender = super().get_queue_sender(queue)
        send_as_is = sender.send_messages

        def send_messages(batch):
            self.sends += 1
            if self.sends == 1:
                queued = self.transport_ref[0]._queued[queue]
                for _ in range(1000):
                    if len(queued) == self.waiting:
                        break
                    threading.Event().wait(0.005)
            if self.fail and self.sends == 2:
                raise ConnectionError("service bus unreachable")
            send_as_is(batch)

        sender.send_messages = send_messages
        return sender


def concurrent_sends(transport, first, others):
    errors = {}

    def send(n):
        try:
            transport.send([numbered_refresh_request(n)])
        except Exception as error:  # noqa: BLE001 - collected for the assertions
            errors[n] = error

    leader = threading.Thread(target=send, args=(first,))
    leader.start()
    while not transport._senders:
        threading.Event().wait(0.001)
    threads = [threading.Thread(target=send, args=(n,)) for n in others]
    for thread in [*threads]:
        thread.start()
    for thread in [leader, *threads]:
        thread.join()
    return errors


def test_concurrent_sends_share_one_network_send():
    # While one invocation's send is on the network, the others queue; the next sender holder sends
    # all of their events in one batch instead of one round trip each.
    ref = []
    client = SlowFirstSendClient(ref, waiting=7)
    transport = ServiceBusTransport(client)
    ref.append(transport)
    assert concurrent_sends(transport, 0, range(1, 8)) == {}
    sender = client.senders[REFRESH_REQUESTED]
    assert sorted(message.message_id for batch in sender.sent_batches for message in batch) == sorted(
        f"id-{n}" for n in range(8)
    )
    assert [len(batch) for batch in sender.sent_batches] == [1, 7]
    assert not sender.overlapped


def test_a_failed_shared_send_fails_every_invocation_in_it():
    ref = []
    client = SlowFirstSendClient(ref, waiting=7, fail=True)
    transport = ServiceBusTransport(client)
    ref.append(transport)
    errors = concurrent_sends(transport, 0, range(1, 8))
    assert sorted(errors) == list(range(1, 8))  # the first send went through; the shared one failed
    assert all(isinstance(error, ConnectionError) for error in errors.values())
    transport.send([numbered_refresh_request(9)])  # the next send works: nothing failed stays queued
    sent = [message.message_id for batch in client.senders[REFRESH_REQUESTED].sent_batches for message in batch]
    assert sent == ["id-0", "id-9"]


def test_a_retry_is_a_scheduled_message_on_the_trigger_queue_with_a_message_id_of_its_own():
    client = RecordingClient()
    transport = ServiceBusTransport(client)
    assert EventPublisher([transport]).retry_scheduler is transport
    event = numbered_refresh_request(7)
    at = utc_now() + timedelta(seconds=30)
    transport.schedule_retry(event, 2, at)
    [(message, when)] = client.senders[REFRESH_REQUESTED].scheduled
    assert when == at
    # Duplicate detection would drop the request's own id: the retry has one of its own; the body
    # (and so the request id the function sees) is the request's.
    assert message.message_id == "id-7.retry-0.2"
    assert json.loads(b"".join(message.body)) == json.loads(event.to_json())
    assert message.session_id is None  # the refresh queue is not session-enabled (docs/scale.md)
    assert message.content_type == CONTENT_TYPE
    assert message.application_properties == {"type": REFRESH_REQUESTED}


def test_without_service_bus_there_is_no_scheduler_and_the_queue_redelivers_at_once():
    class RabbitOnly:
        def send(self, events):
            pass

        def close(self):
            pass

    assert EventPublisher([RabbitOnly()]).retry_scheduler is None


def _scheduled_request(not_before):
    now = utc_now()
    data = RefreshRequestedData(
        connection_id="conn-s",
        integration_id="salesforce",
        tenant_id="t",
        expires_at=now + timedelta(hours=1),
        requested_at=now,
        not_before=not_before,
    )
    return make_event(data)


def test_a_scheduled_refresh_request_is_a_scheduled_message_delivered_at_its_not_before():
    client = RecordingClient()
    at = (utc_now() + timedelta(minutes=7)).replace(microsecond=123000)
    event = _scheduled_request(at)
    ServiceBusTransport(client).send([event, numbered_refresh_request(1)])

    [[scheduled, immediate]] = client.senders[REFRESH_REQUESTED].sent_batches
    assert scheduled.message_id == event.id  # the request's own id: duplicate detection still applies
    assert scheduled.scheduled_enqueue_time_utc == at
    # The SDK puts it on the wire as the message annotation Service Bus reads.
    annotations = scheduled.raw_amqp_message.annotations
    assert annotations[b"x-opt-scheduled-enqueue-time"] == at
    assert json.loads(b"".join(scheduled.body))["data"]["notBefore"] == format_time(at)
    assert immediate.scheduled_enqueue_time_utc is None
    assert b"x-opt-scheduled-enqueue-time" not in (immediate.raw_amqp_message.annotations or {})


def test_a_not_before_already_past_is_delivered_at_once():
    client = RecordingClient()
    ServiceBusTransport(client).send([_scheduled_request(utc_now() - timedelta(seconds=5))])
    [[message]] = client.senders[REFRESH_REQUESTED].sent_batches
    assert message.scheduled_enqueue_time_utc is None
