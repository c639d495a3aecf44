"""A local stand-in for the Functions host, driven by RabbitMQ.

It loads the three function folders the way the Functions host does (their `function.json` and
`main()`), declares one RabbitMQ queue per Service Bus trigger, bound to the platform exchange with
the trigger's queue name as routing key (= the event type), and invokes `main()` with real
`azure.functions` trigger objects. A message whose function raises is put back and retried; after
`max_deliveries` attempts RabbitMQ dead-letters it to `<queue>.dead-letter`, where it can be
inspected. Queues are quorum queues: the broker counts deliveries (`x-delivery-count`) and applies
the limit, like Service Bus's MaxDeliveryCount.

Like Service Bus scheduled messages, a refresh request whose `notBefore` is in the future is not handed
to the function before that time, and a transient failure's retry comes back at its time: both wait in
durable queues of the host (`<queue>.scheduled` and its delay queues) and are delivered by a releasing
thread (DeliveryScheduler); they survive a restart of the host.

Like the refresh queue's Service Bus duplicate detection, a refresh request whose Service Bus MessageId the queue
accepted within its history window (localdev/service_bus_queues.json) is dropped: RabbitMQ cannot refuse it when it
is sent, so the host drops it when it first takes it off the queue (a retry, which the host sends itself, when it
schedules it). The history is kept in a file per exchange and queue under the local state directory (`.local/`, or
LOCALDEV_STATE_DIR), so separate `run --once` processes see one queue history, as Azure hosts share one queue.

The broker may go away (a restart, a dropped connection): `run` reconnects with a short back-off
and keeps consuming (unacknowledged messages are redelivered by RabbitMQ); `run --once` does the
same for up to `reconnect_timeout_s`, then stops with a one-line error and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import azure.functions.servicebus as func_servicebus
import pika
from azure.functions.timer import TimerRequest

from localdev.broker import (
    BROKER_CONNECTION_ERRORS,
    FATAL_CONNECTION_ERRORS,
    RECONNECT_INITIAL_S,
    RECONNECT_MAX_S,
    connection_parameters,
    describe_connection_error,
)
from localdev.duplicate_detection import DuplicateDetection
from localdev.errors import BrokerUnavailableError
from localdev.failures import broker_address
from localdev.scheduled_delivery import (
    DUE_SUFFIX,
    HOLD_MAX_S,
    NOT_BEFORE_TOLERANCE_MS,
    RELEASED_HEADER,
    SCHEDULE_POLL_S,
    SERVICE_BUS_MESSAGE_ID_HEADER,
    DeliveryScheduler,
    format_epoch_ms,
    not_before_ms,
    wall_clock_ms,
)
from localdev.service_bus_model import queue_properties
from shared import runtime
from shared.errors import PublishError, SettingsError
from shared.events import CHECK_EXPIRING, REFRESH_FAILED, REFRESH_REQUESTED, REFRESHED, CloudEvent
from shared.messaging import service_bus_message_id
from shared.secrets import scrub_logs
from shared.settings import Settings

logger = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parent.parent
QUEUE_PREFIX = "integration-token-refresh."

RECONNECT_TIMEOUT_S = 60.0  # `run --once`: how long a cycle waits for the broker to come back
# The per-cycle outcome queue outlives a broker restart (durable) but not a crashed run (expires).
CYCLE_QUEUE_EXPIRES_MS = 30 * 60 * 1000
# `run --once` workers consume (prefetch 1) until nothing has come for this long: the queue is drained.
DRAIN_IDLE_S = 0.2
# Outcomes are counted from the cycle queue this many at a time (a consumer with this prefetch).
COUNT_PREFETCH = 500
# Where the local host keeps what must outlive a process (the duplicate detection history): LOCALDEV_STATE_DIR,
# else .local/ in the app root (git-ignored).
STATE_DIR_VARIABLE = "LOCALDEV_STATE_DIR"
DEFAULT_STATE_DIR = APP_ROOT / ".local"


@dataclass(frozen=True)
class QueueFunction:
    """A Service-Bus-triggered function folder and the local queue that drives it."""

    name: str
    event_type: str
    main: Callable[[Any], Any]
    queue: str

    @property
    def dead_letter_queue(self) -> str:
        return self.queue + ".dead-letter"

    @property
    def due_queue(self) -> str:
        """Where the schedule delivers this function's messages at their time; consumed ahead of `queue`."""
        return self.queue + DUE_SUFFIX

    @property
    def queues(self) -> tuple[str, str]:
        """The queues that trigger this function, the due one first."""
        return (self.due_queue, self.queue)


@dataclass(frozen=True)
class InvocationFailure:
    """A function that raised on a message: which, the message, the (scrubbed) reason, and whether that was its
    last delivery (the message was dead-lettered)."""

    function: str
    message_id: str
    reason: str
    dead_lettered: bool


@dataclass
class CycleSummary:
    checks: int = 0
    found: int = 0
    refreshed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    # What went wrong with the cycle itself (not a refresh that failed: that is an outcome, in `failures`).
    check_failures: list[InvocationFailure] = field(default_factory=list)  # only when no check succeeded
    dead_letters: list[InvocationFailure] = field(default_factory=list)  # those this cycle's invocations made
    still_scheduled: int = 0  # deliveries left in the schedule when `scheduled_wait_s` ran out

    @property
    def problems(self) -> list[str]:
        """Why the cycle did not end cleanly (empty: it did): `run --once` exits 1 when there is one."""
        problems = []
        if self.check_failures:
            problems.append("the check failed")
        if self.dead_lettered:
            problems.append(f"{self.dead_lettered} message(s) dead-lettered")
        if self.still_scheduled:
            problems.append(f"{self.still_scheduled} delivery(ies) still scheduled")
        return problems


def load_function_app(
    app_root: Path = APP_ROOT, queue_prefix: str = QUEUE_PREFIX
) -> tuple[Callable[[Any], Any], list[QueueFunction]]:
    """Import every function folder; return the timer's main and the queue-triggered functions."""
    timer_main = None
    queue_functions = []
    for manifest in sorted(app_root.glob("*/function.json")):
        bindings = json.loads(manifest.read_text())["bindings"]
        trigger = next(binding for binding in bindings if binding["type"].endswith("Trigger"))
        module = importlib.import_module(manifest.parent.name)
        if trigger["type"] == "timerTrigger":
            timer_main = module.main
        elif trigger["type"] == "serviceBusTrigger":
            event_type = trigger["queueName"]  # Service Bus queue name = event type = routing key
            queue = queue_prefix + event_type.removeprefix("integration.token.")
            queue_functions.append(QueueFunction(manifest.parent.name, event_type, module.main, queue))
    if timer_main is None or not queue_functions:
        raise RuntimeError(f"no timer and queue functions found under {app_root}")
    return timer_main, queue_functions


@functools.cache
def _function_directory(function_name: str) -> str:
    return str(APP_ROOT / function_name)  # once per function, not per invocation


class LocalInvocationContext:
    """What the Functions host passes as `context`: a fresh invocation id per call."""

    def __init__(self, function_name: str):
        self.invocation_id = str(uuid.uuid4())
        self.function_name = function_name
        self.function_directory = _function_directory(function_name)


def trigger_message(body: bytes, properties: pika.BasicProperties) -> func_servicebus.ServiceBusMessage:
    """The trigger object the Functions host would pass for this message: with the MessageId it would have on
    Service Bus (a scheduled retry's `<id>.retry-<round>.<n>`, a round's `<id>.round-<n>`), as the function sees it
    in Azure."""
    headers = properties.headers or {}
    message_id = properties.message_id or ""
    on_service_bus = service_bus_message_id_of(properties, body) or ""
    if headers.get(SERVICE_BUS_MESSAGE_ID_HEADER) or (message_id and on_service_bus.startswith(message_id)):
        message_id = on_service_bus  # the app's own message: as its Service Bus transport would send it
    return func_servicebus.ServiceBusMessage(
        body=body,
        message_id=message_id,
        content_type=properties.content_type,
        delivery_count=int(headers.get("x-delivery-count", 0)) + 1,
        application_properties={"type": properties.type} if properties.type else {},
        user_properties={},
    )


class LocalHost:
    def __init__(
        self,
        settings: Settings,
        queue_prefix: str = QUEUE_PREFIX,
        app_root: Path = APP_ROOT,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        workers: int = 1,
        *,
        schedule_hold_max_s: float = HOLD_MAX_S,
        duplicate_detection: DuplicateDetection | None = None,
        scheduled_wait_s: float | None = None,
    ):
        if settings.rabbitmq_url is None:
            raise SettingsError("RABBITMQ_URL is not set; the local host needs it: RabbitMQ is its transport")
        self.settings = settings
        # The functions read the same setting to know their last delivery, as with Service Bus.
        self.max_deliveries = settings.max_delivery_count
        self.queue_prefix = queue_prefix
        self.reconnect_timeout_s = reconnect_timeout_s
        # `run --once`: how long after its start the cycle waits for scheduled deliveries (None: until there are
        # none). What is still scheduled then stays queued for the next run.
        self.scheduled_wait_s = scheduled_wait_s
        # The failed invocations of the `run --once` cycle under way (None outside one: `run` keeps none), appended
        # by every worker thread (list.append is atomic).
        self._cycle_failures: list[InvocationFailure] | None = None
        # Refresh requests are handled by this many threads at once, each with its own RabbitMQ
        # connection and prefetch 1 (Azure: host.json maxConcurrentCalls / maxConcurrentSessions).
        self.workers = max(1, workers)
        self.timer_main, self.functions = load_function_app(app_root, queue_prefix)
        self._by_queue = {queue: function for function in self.functions for queue in function.queues}
        self._connection: Any = None
        self._channel: Any = None
        self._stop = threading.Event()
        # No form of a secret in any log line or in what is dead-lettered (the reason is an exception text).
        self._scrub = scrub_logs(settings)
        refresh = next((f for f in self.functions if f.event_type == REFRESH_REQUESTED), None)
        self.refresh_queue = refresh.queue if refresh is not None else None
        # The refresh queue's Service Bus duplicate detection (None: the queue has none, or there is no refresh
        # function). Its history is shared with every host on the same exchange and queue (a file under the state
        # directory), unless `duplicate_detection` is given in its place.
        self.duplicates: DuplicateDetection | None = None
        # The window as deployed: localdev/service_bus_queues.json, which scripts/deploy.sh creates the queues from.
        window = queue_properties()[REFRESH_REQUESTED].duplicate_detection_window
        if refresh is not None and window is not None:
            self.duplicates = duplicate_detection or DuplicateDetection(window, path=history_file(settings, refresh))
        # Refresh requests with a notBefore and the retries of transient failures are delivered later
        # through it (Azure: Service Bus scheduled messages). None for an app without a refresh function.
        self.schedule = (
            DeliveryScheduler(
                settings,
                refresh.queue,
                hold_max_s=schedule_hold_max_s,
                scrub=self._scrub,
                accepts=self._accepts if self.duplicates is not None else None,
                forget=self.duplicates.forget if self.duplicates is not None else None,
            )
            if refresh is not None
            else None
        )

    # Topology -----------------------------------------------------------------------------------

    def connect(self) -> Any:
        parameters = connection_parameters(self.settings)
        try:
            self._connection = pika.BlockingConnection(parameters)
        except FATAL_CONNECTION_ERRORS as error:
            reason = describe_connection_error(error, self._scrub)
            raise BrokerUnavailableError(
                f"RabbitMQ at {broker_address(self.settings)} refused the local host's connection ({reason}); "
                "check the user, password and vhost of RABBITMQ_URL"
            ) from None
        self._channel = self._connection.channel()
        self._channel.basic_qos(prefetch_count=1)
        declare_topology(self._channel, self.settings.rabbitmq_exchange, self.functions, self.max_deliveries)
        if self.schedule is not None:
            runtime.use_retry_scheduler(self.schedule)  # transient failures come back through its schedule
        return self._channel

    def _start_schedule(self) -> None:
        """Start delivering scheduled messages (both modes; it keeps going through reconnects until close())."""
        if self.schedule is not None:
            self.schedule.start()

    def close(self) -> None:
        if self.schedule is not None:
            self.schedule.stop()  # what it held goes back to its queue, for the next host
        self._disconnect()

    def _disconnect(self) -> None:
        if self.schedule is not None:
            if runtime.retry_scheduler_installed() is self.schedule:
                runtime.use_retry_scheduler(None)  # its queues are this host's: not without it
            self.schedule.close_publisher()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # a connection that broke while closing: nothing left to close
                logger.debug("closing the RabbitMQ connection failed", exc_info=True)

    def _reconnect(self, error: BaseException, deadline: float | None, what: str = "connection lost") -> bool:
        """After a lost connection: reconnect with a growing back-off (and redeclare the topology).
        Gives up with BrokerUnavailableError at `deadline` (None: never). False when stop() was called."""
        self._disconnect()
        delay = RECONNECT_INITIAL_S
        lost_at = time.monotonic()
        # Each failed attempt is one line of ours (pika's own records are at DEBUG: shared.third_party_logs).
        logger.warning(
            "RabbitMQ %s at %s (%s); reconnecting (a stale port? `make services-up` rewrites local.settings.json)",
            what,
            broker_address(self.settings),
            describe_connection_error(error, self._scrub),
        )
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() + delay > deadline:
                raise BrokerUnavailableError(
                    f"RabbitMQ connection lost during the cycle and not back within "
                    f"{self.reconnect_timeout_s:g} s ({describe_connection_error(error, self._scrub)}) at "
                    f"{broker_address(self.settings)}; unfinished messages stay queued for the next run"
                )
            if self._stop.wait(delay):
                break
            try:
                self.connect()
            except BROKER_CONNECTION_ERRORS as again:
                self._disconnect()
                error = again
                delay = min(delay * 2, RECONNECT_MAX_S)
                logger.info("RabbitMQ still unavailable (%s)", describe_connection_error(again, self._scrub))
                continue
            logger.warning("Connected to RabbitMQ again after %.1f s", time.monotonic() - lost_at)
            return True
        return False

    # Invocation ---------------------------------------------------------------------------------

    def invoke(self, queue: str, method: Any, properties: Any, body: bytes, channel: Any = None) -> bool:
        """Run the queue's function on one message; ack on success, requeue (or dead-letter) on error.
        A refresh request due later (notBefore) is not run: it goes to the schedule, which delivers it
        then. A refresh request that Service Bus duplicate detection would have dropped is dropped. True when the
        function ran and succeeded.
        `channel`: the channel the message came from (a worker thread's own), default the host's."""
        channel = channel or self._channel
        if self._dropped_as_duplicate(queue, method, properties, body, channel):
            return False
        if self._deferred(queue, method, properties, body, channel):
            return False
        function = self._by_queue[queue]
        message = trigger_message(body, properties)
        try:
            function.main(message, context=LocalInvocationContext(function.name))
        except Exception as error:
            last = message.delivery_count >= self.max_deliveries
            # Scrubbed before it is cut: a secret cut in two would no longer be recognised.
            reason = self._scrub.scrub(f"{error.__class__.__name__}: {error}")[:1000]
            logger.error(
                "Function %s failed on message %s (delivery %d of %d): %s%s",
                function.name,
                message.message_id,
                message.delivery_count,
                self.max_deliveries,
                reason,
                f"; dead-lettering to {function.dead_letter_queue}" if last else "; will retry",
            )
            logger.debug("function failure", exc_info=True)
            if (cycle_failures := self._cycle_failures) is not None:
                cycle_failures.append(InvocationFailure(function.name, message.message_id, reason, last))
            if last:
                self._dead_letter(channel, function, properties, body, reason=reason, deliveries=message.delivery_count)
                channel.basic_ack(method.delivery_tag)
            else:
                # Like a Service Bus abandon: redelivered at once (the functions back off inside an invocation).
                channel.basic_nack(method.delivery_tag, requeue=True)
            return False
        channel.basic_ack(method.delivery_tag)
        return True

    def _dropped_as_duplicate(self, queue: str, method: Any, properties: Any, body: bytes, channel: Any) -> bool:
        """Service Bus duplicate detection on the refresh queue: Azure drops a message sent with a MessageId the
        queue accepted within the history window. RabbitMQ cannot refuse it when it is sent, so the host drops
        (acknowledges) it when it first takes it off the queue, before scheduling or running it. A message coming
        back (a failed invocation, a host that died, a release from the schedule) is the same message, not a new
        send: it is never dropped, only remembered (it may not have reached this check the first time)."""
        if self.duplicates is None or queue != self.refresh_queue:
            return False
        message_id = service_bus_message_id_of(properties, body)
        if message_id is None:
            return False  # Service Bus would make one up: never a duplicate
        headers = properties.headers or {}
        coming_back = method.redelivered or int(headers.get("x-delivery-count") or 0) > 0 or RELEASED_HEADER in headers
        if self.duplicates.first_time(message_id) or coming_back:
            return False
        channel.basic_ack(method.delivery_tag)
        self._log_duplicate(message_id)
        return True

    def _accepts(self, message_id: str) -> bool:
        """Duplicate detection for what the host sends to the refresh queue itself (a retry, when it schedules it:
        Service Bus checks a scheduled message when it is sent). False: dropped."""
        assert self.duplicates is not None  # noqa: S101 - only installed with duplicate detection
        if self.duplicates.first_time(message_id):
            return True
        self._log_duplicate(message_id)
        return False

    def _log_duplicate(self, message_id: str) -> None:
        assert self.duplicates is not None  # noqa: S101 - only called with duplicate detection
        logger.info(
            "Duplicate refresh request %s dropped, as Service Bus duplicate detection would (history window %s)",
            message_id,
            describe_window(self.duplicates.window),
        )

    def _deferred(self, queue: str, method: Any, properties: Any, body: bytes, channel: Any) -> bool:
        """A refresh request whose notBefore is more than NOT_BEFORE_TOLERANCE_MS away moves to the schedule
        (confirmed there, then acknowledged here), like a Service Bus scheduled message. One the schedule
        delivered is never deferred again; a body without a valid notBefore goes to the function as is."""
        if self.schedule is None or queue != self.schedule.target or RELEASED_HEADER in (properties.headers or {}):
            return False
        due_ms = not_before_ms(body)
        if due_ms is None or due_ms - wall_clock_ms() <= NOT_BEFORE_TOLERANCE_MS:
            return False
        try:
            where = self.schedule.deliver_later(body, properties, due_ms)
        except Exception as error:  # noqa: BLE001 - never early: back to its queue (the broker counts deliveries)
            logger.error(
                "Could not schedule refresh request %s (%s); it is put back on %s",
                properties.message_id,
                describe_connection_error(error, self._scrub),
                queue,
            )
            channel.basic_nack(method.delivery_tag, requeue=True)
            return True
        channel.basic_ack(method.delivery_tag)
        logger.debug(
            "Refresh request %s is due at %s: waits in %s", properties.message_id, format_epoch_ms(due_ms), where
        )
        return True

    def _dead_letter(
        self, channel: Any, function: QueueFunction, properties: Any, body: bytes, *, reason: str, deliveries: int
    ) -> None:
        """Park the message with the reason, like Service Bus's DeadLetterReason/ErrorDescription. A dead letter of
        the refresh queue carries the MessageId its replay is sent with (replay_message_id), so duplicate detection
        lets the replay through, as on Service Bus."""
        headers = dict(properties.headers or {}) | {
            "x-dead-letter-reason": "MaxDeliveryCountExceeded",
            "x-dead-letter-error-description": reason,
            "x-source-queue": function.queue,
            "x-delivery-count": deliveries,
        }
        if self.duplicates is not None and function.queue == self.refresh_queue:
            headers[SERVICE_BUS_MESSAGE_ID_HEADER] = replay_message_id(properties.message_id)
        channel.basic_publish(
            "",
            function.dead_letter_queue,
            body,
            pika.BasicProperties(
                content_type=properties.content_type,
                message_id=properties.message_id,
                type=properties.type,
                delivery_mode=pika.DeliveryMode.Persistent,
                timestamp=int(time.time()),  # when it was dead-lettered (shown by `dead-letters`)
                headers=headers,
            ),
        )

    def tick_timer(self) -> None:
        self.timer_main(TimerRequest(past_due=False), context=LocalInvocationContext("check_expiring_timer"))

    # Modes --------------------------------------------------------------------------------------

    def run_once(self) -> CycleSummary:
        """One full cycle: timer, every check message, every refresh request, every outcome counted.
        Scheduled deliveries (requests with a notBefore, retries; also those an earlier host left) are
        waited for: the cycle ends when the schedule is empty and every queue drained.

        A connection lost mid-cycle (e.g. a broker restart) is re-established for up to
        `reconnect_timeout_s` and the cycle goes on: unacknowledged messages come back from their
        queues, and outcomes are counted from a durable per-cycle queue, once per event id."""
        try:
            if self._channel is None:
                self.connect()
            self._start_schedule()
            cycle_queue = self._declare_cycle_queue()
            dead_letters_before = self._dead_letter_count()
        except BROKER_CONNECTION_ERRORS as error:
            raise self._unreachable(error) from None
        try:
            self.tick_timer()
        except PublishError as error:
            raise BrokerUnavailableError(
                f"could not publish the check-expiring event ({self._scrub.scrub(error)})"
            ) from None

        summary = CycleSummary()
        counted: set[str] = set()
        self._cycle_failures = failures = []
        stop_waiting_at = None if self.scheduled_wait_s is None else time.monotonic() + self.scheduled_wait_s
        while True:
            try:
                self._declare_cycle_queue(cycle_queue)
                # Scheduled deliveries (requests with a notBefore, retries) are part of the cycle: wait for
                # them. Counted before draining: whatever was delivered before the count is handled below.
                scheduled = self.schedule.pending() if self.schedule is not None else 0
                if self._process_queued_messages(summary, counted):
                    continue  # it may have scheduled more
                if scheduled and (stop_waiting_at is None or time.monotonic() < stop_waiting_at):
                    self.schedule.wait_for_release(SCHEDULE_POLL_S)
                    continue
                summary.still_scheduled = scheduled  # they stay queued: the next run delivers them
                self._count_outcomes(cycle_queue, summary, counted)
                summary.dead_lettered = self._dead_letter_count() - dead_letters_before
                break
            except BROKER_CONNECTION_ERRORS as error:
                self._reconnect(error, deadline=time.monotonic() + self.reconnect_timeout_s)
        try:
            self._channel.queue_delete(cycle_queue)
        except pika.exceptions.AMQPError:  # it expires on its own (CYCLE_QUEUE_EXPIRES_MS)
            logger.debug("could not delete %s", cycle_queue, exc_info=True)
        self._cycle_failures = None
        summary.dead_letters = [failure for failure in failures if failure.dead_lettered]
        if not summary.checks:  # a check that failed and then succeeded on a redelivery did its job
            summary.check_failures = [failure for failure in failures if failure.function == self._check_function]
        return summary

    @property
    def _check_function(self) -> str | None:
        return next((f.name for f in self.functions if f.event_type == CHECK_EXPIRING), None)

    def _unreachable(self, error: BaseException) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"cannot use RabbitMQ at {broker_address(self.settings)} ({describe_connection_error(error, self._scrub)})"
            "; start it (`make services-up`, which also rewrites the ports in local.settings.json) or fix RABBITMQ_URL"
        )

    def _declare_cycle_queue(self, name: str | None = None) -> str:
        """This cycle's own outcome queue: durable, so a broker restart keeps what it holds; it
        expires if the run dies before deleting it."""
        name = name or f"{self.queue_prefix}cycle-outcomes.{uuid.uuid4().hex[:12]}"
        self._channel.queue_declare(name, durable=True, arguments={"x-expires": CYCLE_QUEUE_EXPIRES_MS})
        for event_type in (REFRESHED, REFRESH_FAILED):
            self._channel.queue_bind(name, self.settings.rabbitmq_exchange, routing_key=event_type)
        return name

    def _process_queued_messages(self, summary: CycleSummary, counted: set[str]) -> bool:
        """Handle every message in the functions' queues until they are empty; True when there were any."""
        any_processed = processed = False
        while True:
            for function in self.functions:  # check-expiring first: it feeds refresh-requested
                for queue in function.queues:  # what the schedule delivered first
                    if function.event_type != CHECK_EXPIRING and self.workers > 1:
                        processed |= self._drain_with_workers(function, queue, summary, counted)
                        continue
                    while (delivery := self._channel.basic_get(queue)) != (None, None, None):
                        self._invoke_counted(function, queue, delivery, self._channel, summary, counted)
                        processed = True
            if not processed:
                return any_processed
            any_processed, processed = True, False

    def _invoke_counted(  # noqa: PLR0917 - internal helper of the two drain loops
        self,
        function: QueueFunction,
        queue: str,
        delivery: Any,
        channel: Any,
        summary: CycleSummary,
        counted: set[str],
        lock: Any = None,
    ) -> None:
        method, properties, body = delivery
        if not self.invoke(queue, method, properties, body, channel):
            return
        with lock or contextlib.nullcontext():
            if function.event_type == CHECK_EXPIRING:
                summary.checks += 1
            elif _first_time(counted, "request", properties.message_id):
                summary.found += 1  # a re-run check requests the same ids again

    def _drain_with_workers(
        self, function: QueueFunction, queue: str, summary: CycleSummary, counted: set[str]
    ) -> bool:
        """Empty `queue` (one of `function`'s) with `workers` threads, each on its own connection and channel
        (pika connections must not be shared between threads). True when anything was processed."""
        waiting = self._channel.queue_declare(queue, passive=True).method.message_count
        if not waiting:
            return False  # nothing to get: no worker connections for an empty queue
        if waiting == 1:  # e.g. a scheduled request just delivered: at once, without opening connections
            if (delivery := self._channel.basic_get(queue)) == (None, None, None):
                return False
            self._invoke_counted(function, queue, delivery, self._channel, summary, counted)
            return True
        lock = threading.Lock()
        processed: list[bool] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with pika.BlockingConnection(connection_parameters(self.settings)) as conn:
                    channel = conn.channel()
                    channel.basic_qos(prefetch_count=1)
                    # Consumed, not polled: the broker pushes the next message as this one is acked
                    # instead of a basic_get round trip per message.
                    for delivery in channel.consume(queue, inactivity_timeout=DRAIN_IDLE_S):
                        if delivery[0] is None or self._stop.is_set():
                            break  # drained (what is left is held by the other workers), or stopping
                        self._invoke_counted(function, queue, delivery, channel, summary, counted, lock)
                        processed.append(True)
                    # A message pushed in the instant between the idle timeout and this cancel goes back to
                    # its queue (the next drain pass takes it); the quorum queue counts that as a delivery.
                    channel.cancel()
            except Exception as error:  # noqa: BLE001 - handed to the main thread, which reconnects or gives up
                errors.append(error)

        workers = min(self.workers, waiting)  # no more connections than messages
        threads = [threading.Thread(target=work, name=f"local-host-worker-{n}") for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return bool(processed)

    def _count_outcomes(self, cycle_queue: str, summary: CycleSummary, counted: set[str]) -> None:
        for _, properties, body in self._drain_outcomes(cycle_queue):
            if not _first_time(counted, "outcome", properties.message_id):
                continue  # at-least-once: the same event published again after a failure
            if properties.type == REFRESHED:
                summary.refreshed += 1
            else:
                summary.failed += 1
                summary.failures.append(json.loads(body)["data"])

    def _drain_outcomes(self, cycle_queue: str) -> Iterator[tuple[Any, Any, bytes]]:
        """Every message in the cycle queue, removed from it: consumed up to COUNT_PREFETCH at a time, not one
        basic_get round trip each (thousands after a large cycle). Each is acked once handed on; what the
        consumer held beyond that goes back to the queue when it is cancelled."""
        channel = self._channel
        while waiting := channel.queue_declare(cycle_queue, passive=True).method.message_count:
            channel.basic_qos(prefetch_count=COUNT_PREFETCH)
            try:
                for taken, delivery in enumerate(channel.consume(cycle_queue, inactivity_timeout=1), start=1):
                    if delivery[0] is None:
                        break
                    yield delivery
                    channel.basic_ack(delivery[0].delivery_tag)
                    if taken >= waiting:
                        break
            finally:
                channel.cancel()
                channel.basic_qos(prefetch_count=1)

    def run_forever(self, tick_seconds: float | None = None) -> None:
        """Consume until stop() or Ctrl-C; tick the timer so TOKEN_REFRESH_INTERVAL_MS sets the cadence.
        A broker that is not there yet, or lost, is waited for with a growing back-off (up to RECONNECT_MAX_S), as the
        Functions host keeps running through an outage; a broker that refuses RABBITMQ_URL's user stops it.
        With workers > 1, that many more threads consume refresh requests, each on its own connection."""
        extra = [
            threading.Thread(target=self._consume_forever, args=(function,), name=f"local-host-worker-{n}", daemon=True)
            for function in self.functions
            if function.event_type != CHECK_EXPIRING
            for n in range(self.workers - 1)
        ]
        for thread in extra:
            thread.start()
        tick = tick_seconds or max(1.0, min(60.0, self.settings.interval_ms / 10_000))
        next_tick = time.monotonic()
        announced = False
        try:
            while not self._stop.is_set():
                try:
                    if self._channel is None:
                        self.connect()
                    self._subscribe()
                except BROKER_CONNECTION_ERRORS as error:
                    if not self._reconnect(error, deadline=None, what="unavailable"):
                        break
                    continue
                self._start_schedule()
                if not announced:
                    announced = True
                    logger.info(
                        "Local host running: queues %s, timer tick %.1f s (Ctrl-C stops)",
                        ", ".join(f.queue for f in self.functions),
                        tick,
                    )
                try:
                    while not self._stop.is_set():
                        if time.monotonic() >= next_tick:
                            self._tick_timer_logging_failures()
                            next_tick = time.monotonic() + tick
                        wait = min(0.5, max(0.0, next_tick - time.monotonic()))
                        self._connection.process_data_events(time_limit=wait)
                except BROKER_CONNECTION_ERRORS as error:
                    # Unacknowledged messages go back to their queues; they are redelivered after reconnecting.
                    if not self._reconnect(error, deadline=None):
                        break
        finally:
            self.close()

    def _consume_forever(self, function: QueueFunction) -> None:
        """A worker thread: its own connection, prefetch 1, reconnecting until stop()."""
        delay = RECONNECT_INITIAL_S
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(connection_parameters(self.settings))
                try:
                    channel = connection.channel()
                    channel.basic_qos(prefetch_count=1)
                    for queue in function.queues:
                        channel.basic_consume(
                            queue,
                            lambda ch, method, properties, body, queue=queue: self.invoke(
                                queue, method, properties, body, ch
                            ),
                        )
                    delay = RECONNECT_INITIAL_S
                    while not self._stop.is_set():
                        connection.process_data_events(time_limit=0.5)
                finally:
                    with contextlib.suppress(Exception):
                        connection.close()
            except BROKER_CONNECTION_ERRORS:
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _subscribe(self) -> None:
        for function in self.functions:
            for queue in function.queues:
                self._channel.basic_consume(
                    queue,
                    lambda ch, method, properties, body, queue=queue: self.invoke(queue, method, properties, body),
                )

    def _tick_timer_logging_failures(self) -> None:
        """Like the Functions host: a failed timer invocation is logged; the next tick runs as usual."""
        try:
            self.tick_timer()
        except Exception as error:
            logger.error("Timer function failed: %s", self._scrub.scrub(f"{error.__class__.__name__}: {error}")[:1000])
            logger.debug("timer failure", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self.schedule is not None:
            self.schedule.stop(wait=False)  # close() waits for it

    def _dead_letter_count(self) -> int:
        return sum(
            self._channel.queue_declare(f.dead_letter_queue, passive=True).method.message_count for f in self.functions
        )


def history_file(settings: Settings, refresh: QueueFunction) -> Path:
    """The refresh queue's duplicate detection history (duplicate_history_path), its directory made now: one that
    cannot be is a setting to change, said once before the host starts, not a failure of every message."""
    path = duplicate_history_path(settings, refresh.queue)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError(
            f"cannot keep the refresh queue's duplicate detection history in {path.parent} "
            f"({error.strerror or error.__class__.__name__}); set {STATE_DIR_VARIABLE} to a writable directory"
        ) from None
    return path


def replay_message_id(message_id: str | None) -> str:
    """The Service Bus MessageId of a dead letter's replay: `<message id>.replay-<n>`, n when it was dead-lettered
    (ms), as the Service Bus replay adds the dead letter's sequence number (operator_commands.replayed_message_id).
    The RabbitMQ message id, never the body's (a poison message's body may hold anything); a random one when none or
    too long (Service Bus takes 128 characters)."""
    replay_id = f"{message_id}.replay-{time.time_ns() // 1_000_000}"
    return replay_id if message_id and len(replay_id) <= 128 else f"{uuid.uuid4()}.replay"


def state_dir() -> Path:
    """Where the local host keeps state that outlives a process: LOCALDEV_STATE_DIR, else .local/ in the app root."""
    return Path(os.environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR)


def duplicate_history_path(settings: Settings, queue: str) -> Path:
    """The duplicate detection history of `queue` on the settings' exchange: one file per exchange and queue, so
    hosts on other exchanges (the tests') never share it. Clearing it is deleting it."""
    return state_dir() / "servicebus" / _file_name(settings.rabbitmq_exchange) / f"{_file_name(queue)}.duplicates.jsonl"


def _file_name(name: str) -> str:
    """A RabbitMQ name as one path component: percent-encoded, never empty, `.` or `..`."""
    encoded = quote(name, safe="")
    return encoded if encoded.strip(".") else encoded.replace(".", "%2E") or "%"


def describe_window(window: timedelta) -> str:
    """A history window for a log line: `2 h`, `10 min`, `30 s`."""
    seconds = window.total_seconds()
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds:g} s"


def service_bus_message_id_of(properties: Any, body: bytes) -> str | None:
    """The MessageId a message on a local queue would have on Service Bus: the x-service-bus-message-id header the
    host sets where it differs (a retry, a dead letter's replay), else the one the app's Service Bus transport gives
    the event in the body (shared.messaging.service_bus_message_id: its id, and its attempt round), else the
    RabbitMQ message id (a body that is no event). None when there is none at all."""
    header = (properties.headers or {}).get(SERVICE_BUS_MESSAGE_ID_HEADER)
    if header:
        return header.decode("utf-8", "replace") if isinstance(header, bytes) else str(header)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("id"), str) and document["id"]:
        data = document.get("data")
        # Not validated: only the fields the MessageId is made of (the function judges the rest).
        event = CloudEvent.model_construct(
            id=document["id"], type=document.get("type"), data=data if isinstance(data, dict) else {}
        )
        return service_bus_message_id(event)
    return properties.message_id or None


def _first_time(seen: set[str], kind: str, message_id: str | None) -> bool:
    """Whether this message id (of this kind) is new to the cycle; messages without an id always count."""
    if not message_id:
        return True
    key = f"{kind}:{message_id}"
    if key in seen:
        return False
    seen.add(key)
    return True


def declare_topology(channel: Any, exchange: str, functions: list[QueueFunction], max_deliveries: int) -> None:
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    for function in functions:
        channel.queue_declare(function.dead_letter_queue, durable=True)
        for queue in function.queues:  # the due queue only gets what the schedule delivers: not bound
            channel.queue_declare(
                queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    # Safety net for a host that dies mid-message over and over; failures dead-letter in invoke().
                    "x-delivery-limit": max_deliveries,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": function.dead_letter_queue,
                },
            )
        channel.queue_bind(function.queue, exchange, routing_key=function.event_type)
