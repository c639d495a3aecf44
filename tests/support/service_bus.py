"""A Service Bus client that records instead of sending: the SDK's real message and batch types, only
the network half replaced (no broker usable by the SDK can run here)."""

from azure.servicebus import ServiceBusMessage, ServiceBusMessageBatch

CONNECTION_STRING = (
    "Endpoint=sb://example-ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=bm90LWEtcmVhbC1rZXk="
)
SHARED_ACCESS_KEY = "bm90LWEtcmVhbC1rZXk="  # the key inside CONNECTION_STRING


class RecordingSender:
    """Stands in for the network half of ServiceBusSender; batches are the SDK's real type."""

    def __init__(self, queue, max_batch_bytes):
        self.queue = queue
        self.max_batch_bytes = max_batch_bytes
        self.sent_batches: list[list[ServiceBusMessage]] = []
        self.in_send = 0
        self.overlapped = False
        self.scheduled: list[tuple[ServiceBusMessage, object]] = []

    def create_message_batch(self):
        return ServiceBusMessageBatch(max_size_in_bytes=self.max_batch_bytes)

    def send_messages(self, batch):
        assert isinstance(batch, ServiceBusMessageBatch)
        self.in_send += 1
        self.overlapped |= self.in_send > 1
        self.sent_batches.append(list(batch._messages))
        self.in_send -= 1

    def schedule_messages(self, message, schedule_time_utc):
        assert isinstance(message, ServiceBusMessage)
        assert schedule_time_utc.tzinfo is not None
        self.scheduled.append((message, schedule_time_utc))
        return [len(self.scheduled)]  # sequence numbers of the scheduled messages

    def close(self):
        pass


class RecordingClient:
    def __init__(self, max_batch_bytes=256 * 1024):
        self.senders: dict[str, RecordingSender] = {}
        self.max_batch_bytes = max_batch_bytes

    def get_queue_sender(self, queue):
        sender = RecordingSender(queue, self.max_batch_bytes)
        self.senders[queue] = sender
        return sender

    def close(self):
        pass
