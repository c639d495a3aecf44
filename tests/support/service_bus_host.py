"""Azure's Service Bus path, played on the Service Bus model (localdev/service_bus_model.py) with the functions in
the real Functions worker (tests/support/functions_worker.py).

- The app sends through its own ServiceBusTransport, with `ModelClient` in place of the SDK's network half: the
  messages are the SDK's real ServiceBusMessage / ServiceBusMessageBatch, handed to the model, which applies what the
  broker does with them (duplicate detection, scheduled messages, sessions, size limit).
- `FunctionsHostOnModel` is the Service Bus trigger of the Functions host: it receives with peek-lock, up to
  host.json's maxConcurrentCalls per function, renews each lock up to maxAutoLockRenewalDuration, invokes the function
  in the real worker with the trigger data the extension sends, completes on success (autoCompleteMessages) and
  abandons on failure. A lock that runs out while the function still runs makes the model deliver the message again
  meanwhile, as Service Bus does.
- `kill(...)` models a host that dies mid-invocation: the invocation stops at that point (`HostKilled`, raised in
  the invocation's thread, so nothing after it runs) and the message is never settled -- its lock runs out and it is
  delivered again with DeliveryCount + 1.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusMessageBatch

from localdev.service_bus_model import (
    Delivery,
    MessageLockLostError,
    ModelMessage,
    ProcessorOptions,
    ServiceBusModel,
)
from tests.support.functions_worker import FunctionsWorker, InvocationResult, ServiceBusDelivery, function_folders

NAMESPACE = "token-refresh-bus.servicebus.windows.net"


class ModelSender:
    """The network half of a ServiceBusSender, on the model: what the app sends reaches the model's queue."""

    def __init__(self, model: ServiceBusModel, queue: str):
        self.model, self.queue = model, queue

    def create_message_batch(self) -> ServiceBusMessageBatch:
        size = self.model.queues[self.queue].max_message_size_bytes
        return ServiceBusMessageBatch(max_size_in_bytes=size)

    def send_messages(self, messages: Any) -> None:
        batch = messages._messages if isinstance(messages, ServiceBusMessageBatch) else messages
        for message in batch if isinstance(batch, list) else [batch]:
            at = message.scheduled_enqueue_time_utc
            if at is not None:
                # A message with a ScheduledEnqueueTimeUtc is a scheduled message (the broker holds it until then).
                self.model.schedule(self.queue, ModelMessage.of_sdk_message(message), at)
            else:
                self.model.send(self.queue, ModelMessage.of_sdk_message(message))

    def schedule_messages(self, message: ServiceBusMessage, schedule_time_utc: datetime) -> list[int]:
        return [self.model.schedule(self.queue, ModelMessage.of_sdk_message(message), schedule_time_utc)]

    def close(self) -> None:
        pass


class ModelClient:
    """Stands in for ServiceBusClient: senders whose sends go to the model."""

    fully_qualified_namespace = NAMESPACE

    def __init__(self, model: ServiceBusModel):
        self.model = model

    def get_queue_sender(self, queue: str) -> ModelSender:
        if queue not in self.model.queues:
            raise KeyError(f"no queue {queue!r} in the namespace")  # the SDK fails the send: the entity is missing
        return ModelSender(self.model, queue)

    def close(self) -> None:
        pass


class HostKilled(BaseException):
    """Raised in an invocation's thread where the host dies: the app catches Exception, so nothing after it runs."""


@dataclass
class Invocation:
    """One invocation of a Service Bus triggered function, and how the host settled it."""

    function_name: str
    delivery: Delivery
    started: float
    ended: float | None = None
    result: InvocationResult | None = None
    settled: str = ""  # "completed", "abandoned", "lock lost" (the settle failed), "killed"


@dataclass
class _Running:
    invocation: Invocation
    future: Future
    locked_since: float
    killed: bool = False


@dataclass
class KillRule:
    """Where the host dies: `when(function_name, delivery)` chooses the invocation; `after_return` kills it after
    the function returned (before the host settles), else `arm` is run in the invocation (to raise HostKilled)."""

    when: Callable[[str, Delivery], bool]
    after_return: bool = False
    times: int = 1


class FunctionsHostOnModel:
    """The Functions host's Service Bus trigger over the model (see the module docstring), for every function of the
    app with a Service Bus trigger. Drive it with `fire_timer()` and `run_until_idle()`."""

    def __init__(self, worker: FunctionsWorker, model: ServiceBusModel, options: ProcessorOptions):
        self.worker, self.model, self.options = worker, model, options
        self.functions_by_queue: dict[str, str] = {}
        for folder in function_folders(worker.app_root):
            if folder.queue_name is None:
                continue
            sessions = bool(folder.trigger.get("isSessionsEnabled", False))
            if sessions != model.queues[folder.queue_name].requires_session:
                # The extension's receiver and the queue must agree, or the trigger cannot receive at all.
                raise AssertionError(
                    f"{folder.name}: isSessionsEnabled={sessions} but queue {folder.queue_name!r} has "
                    f"requiresSession={model.queues[folder.queue_name].requires_session}"
                )
            self.functions_by_queue[folder.queue_name] = folder.name
        self.invocations: list[Invocation] = []
        self.kill_rules: list[KillRule] = []
        self.paused: set[str] = set()
        # Called on every turn of run_until_idle: e.g. to forward what the app published elsewhere to the model.
        self.feed: Callable[[], None] = lambda: None
        self._running: list[_Running] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(options.max_concurrent_calls * 2, thread_name_prefix="functions-host")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # Driving --------------------------------------------------------------------------------------

    def fire_timer(self) -> None:
        self.worker.invoke_timer("check_expiring_timer").raise_for_failure()

    def kill(self, when: Callable[[str, Delivery], bool], *, after_return: bool = False, times: int = 1) -> None:
        """The host dies in the next invocation `when` chooses: with `after_return`, once the function returned and
        before the message is settled; otherwise where the test raises HostKilled (see `killing`)."""
        self.kill_rules.append(KillRule(when, after_return, times))

    def run_until_idle(self, timeout_s: float = 60.0, quiet_s: float = 0.3, horizon_s: float = 20.0) -> None:
        """Receive, invoke and settle until, for `quiet_s`, no invocation runs, no message waits in a function's
        queue (paused ones aside) and no scheduled message or lock is due within `horizon_s` (0: stop before a
        scheduled retry comes due)."""
        deadline = time.monotonic() + timeout_s
        idle_since: float | None = None
        while time.monotonic() < deadline:
            self.feed()
            self._settle_finished()
            self._renew_locks()
            started = self._receive_and_invoke()
            if started or self._running or self._pending(horizon_s):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= quiet_s:
                return
            time.sleep(0.01)
        raise AssertionError(f"the host was still busy after {timeout_s} s: {self._running}")

    # Internals ------------------------------------------------------------------------------------

    def pause(self, queue: str) -> None:
        """Stop receiving from `queue` (its function's instances are busy elsewhere) until resume()."""
        self.paused.add(queue)

    def resume(self, queue: str) -> None:
        self.paused.discard(queue)

    def _pending(self, within_s: float) -> bool:
        if any(self.model.active_count(queue) for queue in self.functions_by_queue if queue not in self.paused):
            return True
        if within_s <= 0:
            return False
        due = self.model.next_due()
        return due is not None and due <= datetime.now(UTC) + timedelta(seconds=within_s)

    def _receive_and_invoke(self) -> int:
        started = 0
        for queue, function_name in self.functions_by_queue.items():
            while queue not in self.paused and self._busy(function_name) < self.options.max_concurrent_calls:
                delivery = self.model.receive(queue)
                if delivery is None:
                    break
                invocation = Invocation(function_name, delivery, time.monotonic())
                future = self._pool.submit(self._invoke, invocation)
                self._running.append(_Running(invocation, future, time.monotonic()))
                self.invocations.append(invocation)
                started += 1
        return started

    def _busy(self, function_name: str) -> int:
        return sum(r.invocation.function_name == function_name for r in self._running if not r.killed)

    def _invoke(self, invocation: Invocation) -> InvocationResult:
        delivery = invocation.delivery
        message = delivery.message
        trigger = ServiceBusDelivery(
            body=message.body,
            message_id=message.message_id,
            delivery_count=delivery.delivery_count,
            sequence_number=delivery.sequence_number,
            content_type=message.content_type,
            session_id=message.session_id,
            application_properties=dict(message.application_properties),
            enqueued_time_utc=delivery.enqueued_time,
            lock_token=delivery.lock_token,
        )
        return self.worker.invoke_service_bus(invocation.function_name, trigger)

    def _kill_rule(self, invocation: Invocation, after_return: bool) -> bool:
        for rule in self.kill_rules:
            if (
                rule.times > 0
                and rule.after_return == after_return
                and rule.when(invocation.function_name, invocation.delivery)
            ):
                rule.times -= 1
                return True
        return False

    def _settle_finished(self) -> None:
        for running in [r for r in self._running if r.future.done()]:
            self._running.remove(running)
            invocation = running.invocation
            invocation.ended = time.monotonic()
            error = running.future.exception()
            if isinstance(error, HostKilled) or (error is None and self._kill_rule(invocation, after_return=True)):
                invocation.settled = "killed"  # never settled: the lock runs out, the message comes back
                continue
            if error is not None:
                raise error
            invocation.result = running.future.result()
            if "HostKilled" in invocation.result.error:
                invocation.settled = "killed"
                continue
            try:
                if invocation.result.succeeded:
                    self.model.complete(invocation.delivery)
                    invocation.settled = "completed"
                else:
                    self.model.abandon(invocation.delivery)
                    invocation.settled = "abandoned"
            except MessageLockLostError:
                # The Functions host logs it; Service Bus has delivered (or will deliver) the message again.
                invocation.settled = "lock lost"

    def _renew_locks(self) -> None:
        """Renew a running invocation's lock before it runs out, up to maxAutoLockRenewalDuration from receipt."""
        now = datetime.now(UTC)
        renewal_ends = self.options.max_auto_lock_renewal_duration.total_seconds()
        for running in self._running:
            delivery = running.invocation.delivery
            lock = self.model.queues[delivery.queue].lock_duration
            if running.invocation.settled == "killed" or delivery.locked_until - now > lock / 2:
                continue
            if time.monotonic() - running.locked_since >= renewal_ends:
                continue  # renewal is over: the lock runs out
            with contextlib.suppress(MessageLockLostError):  # it ran out meanwhile: the model redelivers it
                delivery.locked_until = self.model.renew_lock(delivery)

    def handled(self, function_name: str) -> list[Invocation]:
        return [i for i in self.invocations if i.function_name == function_name]
