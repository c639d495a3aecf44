"""One simulated schedule: a scenario drawn from the seed, the stand-ins wired to the real app entry points, the
run (a check, its refresh deliveries until the system is quiet, a second check and its deliveries) and the
invariants, checked after every step (docs/simulation.md).

The only coupling to the app: `refresh_connection_token` and `RefreshContext` (shared.token_refresh),
`request_refresh_for_expiring_connections` (shared.expiring_check), StateStore and ConnectionStore over the
in-memory containers, Settings, the events module, RefreshOutcome and the failure classes.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.connection_store import ConnectionStore
from shared.errors import PublishError, SettingsError
from shared.events import (
    CHECK_EXPIRING,
    REFRESH_FAILED,
    REFRESH_REQUESTED,
    REFRESHED,
    CheckExpiringData,
    CloudEvent,
    make_event,
    parse_trigger_message,
)
from shared.expiring_check import request_refresh_for_expiring_connections
from shared.ids import connection_key, outcome_event_id
from shared.messaging.service_bus import scheduled_time, service_bus_message_id
from shared.settings import Settings, load_settings
from shared.state_store import StateStore
from shared.times import format_time, parse_expires_at, use_clock
from shared.token_refresh import RefreshContext, refresh_connection_token

from .bus import Bus, Message
from .cosmos import MemoryContainer
from .manager import ANSWERS, Call, Manager
from .scheduler import CRASH, FAULT, LOSE, PROCEED, Actor, Scheduler

START = datetime(2026, 11, 26, 14, 0, tzinfo=UTC).timestamp()
SKIP = ("revoked", "disabled", "deleted")
REFRESH_QUEUE = REFRESH_REQUESTED
CHECK_QUEUE = CHECK_EXPIRING
MAX_STEPS = 4000
FUNCTION_TIMEOUT_S = 600.0  # host.json functionTimeout: the worker is restarted (a crash)
# A delivery of another integration may wait for its own call slots, never for a backlog: a request of a connection
# that is not part of a rate-limited backlog is scheduled within this of the check (shared.refresh_schedule
# SCHEDULE_LEAD_MS, and one slot of its own integration's grid).
NOT_HELD_BACK_S = 2.0


@dataclass
class Faults:
    """How often the scheduler injects each fault, per yield point (0: never)."""

    crash: float = 0.01
    store_outage: float = 0.02
    lost_answer: float = 0.01  # a Cosmos write took effect, its answer was lost
    publish: float = 0.02
    schedule: float = 0.02
    lock_lost: float = 0.01
    duplicate: float = 0.05  # per refresh request sent: duplicate detection misses it
    jump: float = 0.05  # the clock moves on by a few seconds during a step
    failure_metadata: float = 0.3  # per schedule: the manager writes a connection failure into the document
    no_retry_scheduler: float = 0.3  # per schedule: transient failures are redelivered at once (no scheduled copies)
    # Narrowing switches (each names a finding, docs/simulation.md): False keeps the fault away from that code path.
    paced_without_scheduler: bool = True  # pacing with no retry scheduler (finding F7)
    faults_after_outcome: bool = True  # Cosmos faults and crashes after a delivery published its outcome (finding F8)
    reenable: bool = True  # a connection disabled mid-request is enabled again before the next check (finding D3)


# A scripted fault's label prefix meaning: the delivery's first claim write after it called integration-manager
# (whichever Cosmos method the claim protocol uses for it).
CLAIM_WRITE = "<claim write after a call>"
# ... and the delivery's first claim write after it published its outcome (marking the outcome published).
CLAIM_WRITE_AFTER_PUBLISH = "<claim write after the outcome's publish>"
NO_FAULTS = Faults(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@dataclass
class Scenario:
    """What one seed sets up."""

    connections: list[tuple[str, str, float]]  # (id, integration, expires in s from the start)
    retry_scheduler: bool
    failure_metadata: bool
    answers: dict[str, int]
    faults: Faults
    world_events: list[tuple[float, str, str]]  # (at s from the start, "disable" | "enable" | "delete", connection)
    rate_limits: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    newly_due: list[tuple[str, str, float]] = field(default_factory=list)  # connections due at the second check
    second_check_after_s: float | None = None  # None: one interval after the first check
    script: list[str] = field(default_factory=list)  # the manager's answers in call order (then drawn from `answers`)
    # Scripted faults, each once: when a refresh delivery (its MessageId suffix, "" or e.g. ".retry-0.1", and its
    # DeliveryCount) is about to run an operation whose label starts with the prefix: "lose_lock", "fault", "crash",
    # or "freeze" (the process stalls for `seconds`, a VM pause) -- (suffix, count, prefix, action, seconds).
    at_label: list[tuple[str, int, str, str, float]] = field(default_factory=list)
    # Operations of any refresh delivery that fail every time (a Cosmos fault that stays), by label prefix.
    always_fault: list[str] = field(default_factory=list)


def draw_scenario(rng: random.Random, faults: Faults | None = None, answers: dict[str, int] | None = None) -> Scenario:
    """A random scenario: 1-3 connections, a manager script, faults, platform writes meanwhile."""
    count = rng.randint(1, 3)
    connections = [(f"conn-{i}", rng.choice(("github", "xero")), rng.uniform(60, 3000)) for i in range(count)]
    world_events: list[tuple[float, str, str]] = []
    faults = faults or Faults()
    for conn, _, _ in connections:
        roll = rng.random()
        if roll < 0.1:
            at = rng.uniform(0, 300)
            world_events.append((at, "disable", conn))
            enable_at = at + rng.uniform(10, 900)
            if faults.reenable:
                world_events.append((enable_at, "enable", conn))
        elif roll < 0.14:
            world_events.append((rng.uniform(0, 300), rng.choice(("delete", "revoke")), conn))
    scenario = Scenario(
        connections,
        retry_scheduler=rng.random() >= faults.no_retry_scheduler,
        failure_metadata=rng.random() < faults.failure_metadata,
        answers=answers or dict(ANSWERS),
        faults=faults,
        world_events=world_events,
    )
    if rng.random() < 0.15:  # a rate-limited backlog, and a connection of another integration due meanwhile
        scenario.retry_scheduler = scenario.retry_scheduler or not faults.paced_without_scheduler
        scenario.rate_limits = "slow=1/min"
        scenario.connections += [(f"slow-{i}", "slow", rng.uniform(60, 3000)) for i in range(rng.randint(3, 6))]
        scenario.newly_due = [("fresh-0", "github", 1800.0)]
    return scenario


@dataclass
class Request:
    """A refresh-requested message a check sent (the unit of the outcome invariant)."""

    event: CloudEvent
    sent_at: float
    phase: int


@dataclass
class Result:
    """How a schedule went."""

    seed: int
    steps: int
    violations: list[str]
    trace: list[str]
    calls: int
    outcomes: int
    aborted: str = ""

    def report(self) -> str:
        """The failing seed's story: violations, then the trace."""
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s) after {self.steps} steps"]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        lines += ["  trace:"] + [f"    {line}" for line in self.trace]
        return "\n".join(lines)


class Violation(Exception):
    """An invariant failed: the schedule stops."""


class World:
    """The stand-ins around the app for one schedule."""

    def __init__(self, seed: int, scenario: Scenario | None = None, faults: Faults | None = None) -> None:
        self.seed = seed
        self.sim = Scheduler(seed, START)
        rng = self.sim.rng
        self.scenario = scenario or draw_scenario(rng, faults)
        sc = self.scenario
        env = {"TOKEN_REFRESH_SKIP_STATUSES": ",".join(SKIP)} | sc.settings
        if sc.rate_limits:
            env["TOKEN_REFRESH_RATE_LIMITS"] = sc.rate_limits
        if not sc.retry_scheduler:  # the supported way to run without scheduled copies
            env.setdefault("TOKEN_REFRESH_RETRY_DELAY_MS", "0")
        try:
            self.settings: Settings = load_settings(env)
        except SettingsError:
            if sc.retry_scheduler:
                raise
            # The app refuses this combination without scheduled copies (e.g. rate limits): not a reachable setup.
            sc.retry_scheduler = True
            env.pop("TOKEN_REFRESH_RETRY_DELAY_MS")
            self.settings = load_settings(env)
        clock = lambda: self.sim.now  # noqa: E731 - the virtual clock every stand-in reads
        self.connections_db = MemoryContainer("connections", clock)
        self.state_db = MemoryContainer("state", clock, default_ttl=-1)
        for container in (self.connections_db, self.state_db):
            container.gate = self._cosmos_gate
        self.bus = Bus(self.settings.max_delivery_count)
        self.manager = Manager(
            self.sim,
            self.settings.integration_manager_timeout_ms / 1000,
            self.settings.integration_manager_in_flight_ms / 1000,
            self._script,
            self.connections_db.peek,
            self.connections_db.put,
            self._version_of,
            write_failure_metadata=sc.failure_metadata,
        )
        self.manager.on_call_start = self._check_no_overlap
        self.manager.on_refresh = self._check_one_refresh
        self.states = StateStore(self.state_db)
        self.store = ConnectionStore(self.connections_db, self.settings.page_size)
        self.publisher = _Publisher(self)
        self.context = RefreshContext(
            self.settings,
            self.store,
            self.states,
            self.manager,  # type: ignore[arg-type] - the stand-in has the client's one method
            self.publisher,  # type: ignore[arg-type] - the stand-in has the publisher's one method
            sleep=self.sim.sleep,
            retry_scheduler=_RetryScheduler(self) if sc.retry_scheduler else None,
        )
        self.sim.decide = self._decide
        self.requests: list[Request] = []
        self.request_versions: dict[str, tuple[str, str]] = {}  # request id -> (connection, expiresAt)
        self.outcomes: list[tuple[float, CloudEvent]] = []
        self.refreshes: dict[tuple[str, str], list[Call]] = {}
        self.platform_writes: dict[str, float] = {}  # connection -> the last time the platform changed it
        self.platform_log: list[tuple[float, str, str]] = []
        self.violations: list[str] = []
        self.deliveries = 0
        self.phase = 1
        self.check_published: dict[int, list[CloudEvent]] = {1: [], 2: []}
        self.check_time: dict[int, float] = {}
        self.docs_at_check: dict[int, dict[str, dict[str, Any]]] = {}

    # Stand-in hooks --------------------------------------------------------------------------------------------------

    def _cosmos_gate(self, label: str, write: bool) -> bool:
        if label.startswith("state.upsert_item claim-"):
            self._check_claim_write(label.rsplit(maxsplit=1)[-1])
        directive = self.sim.point(label, (FAULT, LOSE) if write else (FAULT,))
        if directive == FAULT:
            from azure.cosmos.exceptions import CosmosHttpResponseError

            raise CosmosHttpResponseError(status_code=503, message="simulated: service unavailable")
        return directive == LOSE

    def _decide(self, actor: Actor) -> str:
        f, rng = self.scenario.faults, self.sim.rng
        if actor.delivery and self.sim.now - actor.started_at > FUNCTION_TIMEOUT_S:
            return CRASH
        roll = rng.random()
        if actor.events and not f.faults_after_outcome:
            return PROCEED
        if roll < f.crash:
            return CRASH
        roll -= f.crash
        if FAULT in actor.allowed:
            chance = f.store_outage if "." in actor.label.split()[0] else f.publish
            if actor.label.startswith("schedule"):
                chance = f.schedule
            if roll < chance:
                return FAULT
            roll -= chance
        if LOSE in actor.allowed and roll < f.lost_answer:
            return LOSE
        return PROCEED

    def _script(self, connection_id: str) -> str:
        if len(self.manager.calls) < len(self.scenario.script):
            return self.scenario.script[len(self.manager.calls)]
        answers = self.scenario.answers
        return self.sim.rng.choices(list(answers), weights=list(answers.values()))[0]

    def _version_of(self, key: str | None) -> tuple[str, str] | None:
        return self.request_versions.get((key or "").split(".")[0])

    # Invariants ------------------------------------------------------------------------------------------------------

    def violate(self, text: str) -> None:
        """Record a violation (the schedule stops after this step)."""
        self.sim.log("INVARIANT", text)
        self.violations.append(text)

    def _check_claim_write(self, claim_id: str) -> None:
        """A delivery writes a claim unconditionally (no etag) only while it holds it: never over the live claim of
        a delivery that took it over."""
        actor, claim = self.sim.current(), self.state_db.peek(claim_id)
        if actor is None or claim is None or claim.get("state") != "in_progress" or not actor.delivery:
            return
        holder = claim.get("holder") or {}
        mine = {"messageId": actor.message.message_id, "delivery": actor.count}
        if claim.get("leaseUntil", 0) > self.sim.now * 1000 and holder and holder != mine:
            self.violate(
                f"{actor.name} ({mine}) overwrote without an etag the live claim {claim_id} of {holder} "
                "(a former holder finishing after a take-over)"
            )

    def _check_no_overlap(self, call: Call) -> None:
        """Never two manager calls for one request in flight at once (at the manager: a call whose client gave up may
        still run); no call for a request whose outcome was published already."""
        request_id, _, attempt_round = (call.key or "").partition(".")
        published = {outcome_event_id(request_id, int(attempt_round or 0), t) for t in (REFRESHED, REFRESH_FAILED)}
        earlier = [e for _, e in self.outcomes if e.id in published]
        if earlier:
            self.violate(
                f"call #{call.number} ({call.actor}) for request {request_id} after its outcome "
                f"{earlier[0].type.rsplit('.', 1)[-1]} was published"
            )
        for other in self.manager.calls:
            if other.version is not None and other.version == call.version and other.server_end > call.start + 1e-6:
                self.violate(
                    f"two calls in flight for one request: call #{call.number} ({call.actor}) started while call "
                    f"#{other.number} ({other.actor}, answer {other.answer}) runs until "
                    f"+{other.server_end - self.sim.start:.1f}s [version {call.version}]"
                )
            if other.version == call.version and other.key != call.key and other.key and call.key:
                same_round = other.key.split(".")[1:] == call.key.split(".")[1:]
                if same_round:
                    self.violate(f"calls #{other.number} and #{call.number} of one request carry different keys")

    def _check_one_refresh(self, call: Call) -> None:
        """At most one successful refresh per token version (connection + the request's expiresAt)."""
        if call.version is None:
            return
        done = self.refreshes.setdefault(call.version, [])
        done.append(call)
        if len(done) > 1:
            self.violate(
                f"token version {call.version} refreshed {len(done)} times: calls "
                + ", ".join(f"#{c.number} ({c.actor})" for c in done)
            )

    def _check_claims(self) -> None:
        """At quiescence: no claim stays in progress past its lease while its request is still to be done (every
        delivery for it has run: none took it over)."""
        for request in self.requests:
            claim = self.state_db.peek(f"claim-{request.event.id}")
            if claim is None or claim.get("state") != "in_progress":
                continue
            lease = claim.get("leaseUntil", 0) / 1000
            if lease <= self.sim.now and self._still_to_do(request.event) and not self._gone_meanwhile(request):
                self.violate(
                    f"claim-{request.event.id} stays in_progress past its lease (+{lease - self.sim.start:.1f}s) "
                    "after every delivery of its request ran"
                )

    def _gone_meanwhile(self, request: Request) -> bool:
        """The platform disabled, revoked or deleted the connection after the request was sent: a documented reason
        for a request to end without an outcome."""
        conn = request.event.data["connectionId"]
        return any(
            t >= request.sent_at and c == conn and action in ("disable", "revoke", "delete")
            for t, action, c in self.platform_log
        )

    def _still_to_do(self, event: CloudEvent) -> bool:
        """The request's connection exists, is refreshable and still has the token the request was for."""
        doc = self.connections_db.peek(event.data["connectionId"])
        if doc is None or str(doc.get("status", "")).lower() in SKIP:
            return False
        current = (doc.get("oauth") or {}).get("expiresAt")
        requested = event.data.get("expiresAt")
        return not (current and requested and parse_expires_at(current) > parse_expires_at(requested))

    def _check_outcomes(self) -> None:
        """At quiescence: every request of this phase ended with an outcome event, or with a documented reason for
        none (the connection revoked or deleted, or refreshed by someone else)."""
        for request in self.requests:
            if request.phase != self.phase:
                continue
            conn = request.event.data["connectionId"]
            # Reported: an outcome since it was sent, or this very request's outcome already (a repeated request id
            # whose claim ended is answered from the claim, which published it before).
            reported = any(t >= request.sent_at and e.data.get("connectionId") == conn for t, e in self.outcomes) or (
                bool(self._outcome_ids_of(request.event.id) & {e.id for _, e in self.outcomes})
            )
            if not reported and not self._gone_meanwhile(request) and self._still_to_do(request.event):
                dead = [m for m in self.bus.messages if m.event.id == request.event.id and m.dead_lettered]
                self.violate(
                    f"request {request.event.id} ({conn}, phase {request.phase}) ended without an outcome event "
                    f"and without a documented reason" + (" (dead-lettered)" if dead else "")
                )

    @staticmethod
    def _outcome_ids_of(request_id: str) -> set[str]:
        return {outcome_event_id(request_id, n, kind) for n in range(4) for kind in (REFRESHED, REFRESH_FAILED)}

    def _check_second_check(self) -> None:
        """The second check asks again for every request that ended retryable, does not ask again for a permanent
        failure of an unchanged connection, and holds no newly due connection back behind a backlog."""
        asked = {e.data["connectionId"]: e for e in self.check_published[2] if e.type == REFRESH_REQUESTED}
        last: dict[str, CloudEvent] = {}
        for t, event in self.outcomes:
            if t < self.check_time[2]:  # what the first phase ended with
                last[event.data["connectionId"]] = event
        for conn, event in last.items():
            if event.type != REFRESH_FAILED:
                continue
            doc = self.docs_at_check[2].get(conn)  # as the second check found it
            if doc is None or str(doc.get("status", "")).lower() in SKIP:
                continue
            failed_at = parse_expires_at(event.data["failedAt"]).timestamp()
            if event.data["retryable"]:
                if self._due_at_second_check(doc) and conn not in asked:
                    self.violate(
                        f"{conn} ended retryable ({event.data['error']['code']}) but the next check did not ask again"
                    )
            elif conn in asked and self.platform_writes.get(conn, 0) < failed_at:
                key = connection_key("tenant-1", doc["integrationId"], conn)
                if self.state_db.peek(f"failure-{key}") is not None:  # recorded (best effort: may be missing)
                    self.violate(
                        f"{conn} failed permanently ({event.data['error']['code']}) and nobody changed it since, but "
                        "the next check asked again (its failure record no longer matches the document's _ts)"
                    )
        at = self.check_time.get(2, 0.0)
        for conn, _, _ in self.scenario.newly_due:
            event = asked.get(conn)
            if event is None:
                self.violate(f"newly due {conn} was not requested by the check")
                continue
            when = scheduled_time(event)
            if when is not None and when.timestamp() - at > NOT_HELD_BACK_S:
                self.violate(f"newly due {conn} held back {when.timestamp() - at:.1f}s behind another backlog")

    def _due_at_second_check(self, doc: dict[str, Any]) -> bool:
        expiry = (doc.get("oauth") or {}).get("expiresAt")
        threshold = self.check_time[2] + self.settings.expiration_threshold_ms / 1000
        return expiry is not None and parse_expires_at(expiry).timestamp() <= threshold

    # The run ---------------------------------------------------------------------------------------------------------

    def seed_connections(self, connections: list[tuple[str, str, float]]) -> None:
        """Write connection documents as the platform does, an hour ago (so that a write now changes `_ts`, which
        has a resolution of one second)."""
        now = self.sim.now
        for conn, integration, expires_in in connections:
            expiry = datetime.fromtimestamp(now + expires_in, UTC)
            self.sim.now = now - 3600
            self.connections_db.put(
                {
                    "id": conn,
                    "tenantId": "tenant-1",
                    "integrationId": integration,
                    "status": "active",
                    "oauth": {"expiresAt": format_time(expiry), "refreshToken": "never-read"},
                }
            )
            self.sim.now = now

    def platform(self, action: str, conn: str) -> None:
        """The platform changes a connection (a user disables, re-enables, revokes or deletes it)."""
        doc = self.connections_db.peek(conn)
        if doc is None:
            return
        self.platform_writes[conn] = self.sim.now
        self.platform_log.append((self.sim.now, action, conn))
        if action == "delete":
            self.connections_db._items.pop(conn)
            return
        doc["status"] = {"disable": "disabled", "enable": "active", "revoke": "revoked"}[action]
        self.connections_db.put(doc)

    def send_check(self, phase: int) -> None:
        """The timer's check-expiring event, on the check queue."""
        now = datetime.fromtimestamp(self.sim.now, UTC)
        threshold = now + timedelta(milliseconds=self.settings.expiration_threshold_ms)
        # A deterministic id (the timer's is random): the same seed, the same trace.
        event = make_event(CheckExpiringData(timestamp=now, threshold_time=threshold), event_id=f"check-{phase}")
        self.check_time[phase] = self.sim.now
        self.docs_at_check[phase] = {d["id"]: d for d in self.connections_db.live_items()}
        self.bus.send(CHECK_QUEUE, event.id, event, self.sim.now)

    def _deliver(self, message: Message) -> None:
        self.deliveries += 1
        number = self.deliveries
        self.bus.lock(message, number, self.sim.now)
        name = f"{'check' if message.queue == CHECK_QUEUE else 'refresh'}#{number}"
        body: Callable[[], Any]
        if message.queue == CHECK_QUEUE:
            body = lambda: self._run_check(message)  # noqa: E731
        else:
            count = message.delivery_count  # as handed out: a lost lock raises the message's count meanwhile
            body = lambda: self._run_refresh(message, count)  # noqa: E731
        actor = self.sim.spawn(name, body, message, number)
        actor.count = message.delivery_count
        self.sim.log(
            name,
            f"delivered {message.message_id[:18]}.. count={message.delivery_count}"
            + (" (duplicate)" if message.duplicate else ""),
        )
        self._step(actor)

    def _run_refresh(self, message: Message, count: int) -> Any:
        envelope, request = parse_trigger_message(message.event.to_json(), REFRESH_REQUESTED, message.message_id, count)
        return refresh_connection_token(
            envelope, request, self.context, delivery_count=count, message_id=message.message_id
        )

    def _run_check(self, message: Message) -> Any:
        _, check = parse_trigger_message(message.event.to_json(), CHECK_EXPIRING, message.message_id, 1)
        return request_refresh_for_expiring_connections(
            check, store=self.store, states=self.states, publisher=self.publisher, settings=self.settings
        )

    def _step(self, actor: Actor) -> None:
        """Resume `actor` with the directive the RNG picks, then settle what ended and check the invariants."""
        directive = PROCEED if actor.label == "start" else self._decide(actor)
        scripted = self._scripted(actor)
        if scripted is not None and scripted[0] == "freeze":
            actor.wake_at = self.sim.now + scripted[1]
            self.sim.log(actor.name, f"{actor.label}: the process freezes for {scripted[1]:.0f}s")
            return
        if scripted is not None and scripted[0] in (FAULT, CRASH):
            directive = scripted[0]
        if (
            actor.message is not None
            and not actor.message.settled
            and (self.sim.rng.random() < self.scenario.faults.lock_lost or (scripted or ("",))[0] == "lose_lock")
        ) and self.bus.holds_lock(actor.message, actor.delivery):
            self.sim.log(actor.name, "lock lost")
            self.bus.lose_lock(actor.message, self.sim.now)
        self.sim.log(actor.name, f"{actor.label}" + ("" if directive == PROCEED else f" -> {directive.upper()}"))
        self.sim.resume(actor, directive)
        if actor.done:
            self._settle(actor)
        if self.violations:
            raise Violation(self.violations[0])
        gaps = self.connections_db.gaps + self.state_db.gaps
        if gaps:  # the app may have caught the AssertionError: fail the run itself
            raise AssertionError(f"the in-memory Cosmos does not know the query or predicate {gaps[0]!r}")

    @staticmethod
    def _claim_write_after_call(actor: Actor) -> bool:
        """The actor is about to write its claim (any write method), after it called integration-manager."""
        operation, _, item = actor.label.partition(" ")
        writes = ("state.upsert_item", "state.replace_item", "state.patch_item")
        return operation in writes and item.startswith("claim-") and actor.calls > 0

    def _matches(self, actor: Actor, prefix: str) -> bool:
        if prefix == CLAIM_WRITE:
            return self._claim_write_after_call(actor)
        if prefix == CLAIM_WRITE_AFTER_PUBLISH:
            return self._claim_write_after_call(actor) and bool(actor.events)
        return actor.label.startswith(prefix)

    def _scripted(self, actor: Actor) -> tuple[str, float] | None:
        """The scenario's scripted fault for this operation of this delivery (each rule fires once)."""
        message = actor.message
        if message is None or message.queue != REFRESH_QUEUE:
            return None
        for rule in self.scenario.at_label:
            suffix, count, prefix, action, seconds = rule
            if (
                message.message_id.removeprefix(message.event.id) == suffix
                and actor.count == count
                and self._matches(actor, prefix)
            ):
                self.scenario.at_label.remove(rule)
                return action, seconds
        if any(actor.label.startswith(prefix) for prefix in self.scenario.always_fault):
            return FAULT, 0.0
        return None

    def _settle(self, actor: Actor) -> None:
        message = actor.message
        self.sim.log(
            actor.name,
            f"ended: {actor.ended}"
            + (f" {type(actor.error).__name__}: {str(actor.error)[:90]}" if actor.error else ""),
        )
        if actor.ended == "broken" or isinstance(actor.error, AssertionError):
            raise AssertionError(f"the simulation itself failed in {actor.name}") from actor.error
        if actor.ended == "returned":
            self.bus.complete(message, actor.delivery)
        elif actor.ended == "raised":
            self.bus.abandon(message, actor.delivery, self.sim.now)
        elif actor.ended == "crashed":
            self.bus.crashed(message, actor.delivery, self.sim.now)

    def run_until_quiet(self) -> None:
        """Run actors, deliveries and timers until nothing is left to happen."""
        sim, rng = self.sim, self.sim.rng
        while True:
            sim.fire_due()
            for message in self.bus.expire_locks(sim.now):
                sim.log("bus", f"lock ran out: {message.message_id[:18]}.. (count {message.delivery_count})")
            runnable: list[Any] = sim.runnable()
            options = runnable + self.bus.available(sim.now)
            if not options:
                times = [t for t in (sim.next_time(), self.bus.next_time(sim.now)) if t is not None]
                if not times:
                    return
                sim.now = max(sim.now, min(times))
                continue
            if sim.steps >= MAX_STEPS:
                raise Violation(f"step limit ({MAX_STEPS}) reached: the protocol does not settle")
            choice = rng.choice(options)
            if isinstance(choice, Message):
                self._deliver(choice)
            else:
                self._step(choice)
            if rng.random() < self.scenario.faults.jump:
                sim.now += rng.choice((0.5, 2.0, 10.0))

    def run(self) -> Result:
        """The whole schedule: check, deliveries, quiet; platform changes meanwhile; a second check and its
        deliveries; quiet. Invariants after every step."""
        sc, sim = self.scenario, self.sim
        saved_random = random.getstate()
        saved_disable = logging.root.manager.disable
        random.seed(self.seed)  # tenacity's jitter reads the global RNG: one actor at a time makes it reproducible
        if not os.environ.get("SIM_LOG"):  # the app logs a lot; a replay may want it (docs/simulation.md)
            logging.disable(logging.CRITICAL)
        aborted = ""
        try:
            with use_clock(lambda: sim.now):
                self.seed_connections(sc.connections)
                for at, action, conn in sc.world_events:
                    sim.at(sim.now + at, f"platform {action} {conn}", lambda a=action, c=conn: self.platform(a, c))
                self.send_check(1)
                self.run_until_quiet()
                self._check_claims()
                self._check_outcomes()
                if self.violations:
                    raise Violation(self.violations[0])
                self.phase = 2
                # The next check: one interval after the first (or at once, when a scenario says so).
                after = sc.second_check_after_s
                interval = self.settings.interval_ms / 1000
                sim.now = sim.now + after if after is not None else max(sim.now + 1.0, START + interval)
                self.seed_connections(sc.newly_due)
                self.send_check(2)
                self.run_until_quiet()
                self._check_second_check()
                self._check_claims()
                self._check_outcomes()
        except Violation as stop:
            if not self.violations:
                aborted = str(stop)
        finally:
            sim.shutdown()
            logging.disable(saved_disable)
            random.setstate(saved_random)
        return Result(
            self.seed, sim.steps, self.violations, sim.trace, len(self.manager.calls), len(self.outcomes), aborted
        )


class _Publisher:
    """The publisher stand-in: refresh requests and checks go to their queues, outcomes are recorded."""

    def __init__(self, world: World) -> None:
        self.world = world

    def publish(self, events: Any) -> int:
        """Publish a batch; the scheduler may fail it before anything is sent, or after (at-least-once)."""
        world, sim = self.world, self.world.sim
        batch = list(events)
        if not batch:
            return 0
        directive = sim.point(f"publish {len(batch)} {batch[0].type.rsplit('.', 1)[-1]}", (FAULT, LOSE))
        if directive == FAULT:
            raise PublishError("could not publish (simulated)", {}, "simulated")
        actor = sim.current()
        for event in batch:
            if event.type == REFRESH_REQUESTED:
                self._request(event)
            elif event.type == CHECK_EXPIRING:
                world.bus.send(CHECK_QUEUE, event.id, event, sim.now)
            elif event.type in (REFRESHED, REFRESH_FAILED):
                world.outcomes.append((sim.now, event))
                if actor is not None:
                    actor.events.append(event)
                sim.log(
                    actor.name if actor else "", f"OUTCOME {event.type.rsplit('.', 1)[-1]} {event.data['connectionId']}"
                )
        if directive == LOSE:
            raise PublishError("the answer was lost after sending (simulated)", {}, "simulated")
        return len(batch)

    def _request(self, event: CloudEvent) -> None:
        world, sim = self.world, self.world.sim
        world.check_published[world.phase].append(event)
        world.request_versions[event.id] = (event.data["connectionId"], event.data.get("expiresAt", ""))
        at = scheduled_time(event)
        dup = sim.rng.random() < world.scenario.faults.duplicate
        message_id = service_bus_message_id(event)
        # A request counts once it is sent, even when duplicate detection drops it: it must still end reported.
        world.requests.append(Request(event, sim.now, world.phase))
        for copy in (False, True) if dup else (False,):
            world.bus.send(REFRESH_QUEUE, message_id, event, sim.now, at.timestamp() if at else None, dup=copy)


class _RetryScheduler:
    """The retry scheduler stand-in (ServiceBusTransport.schedule_retry): a scheduled copy `<id>.retry-<round>.<n>`."""

    def __init__(self, world: World) -> None:
        self.world = world

    def schedule_retry(self, event: CloudEvent, retry: int, at: datetime, attempt_round: int = 0) -> None:
        """Schedule a copy of `event` at `at`; the scheduler may fail it."""
        sim = self.world.sim
        if sim.point(f"schedule_retry {retry} at +{at.timestamp() - sim.start:.1f}s", (FAULT,)) == FAULT:
            raise RuntimeError("simulated: could not schedule the message")
        self.world.bus.send(REFRESH_QUEUE, f"{event.id}.retry-{attempt_round}.{retry}", event, sim.now, at.timestamp())


# The faults the committed random exploration explores: every one, since no finding is open. A finding found open
# narrows the switch that reaches it here, named by the finding, until it is fixed (docs/simulation.md).
CI_FAULTS = Faults()


@dataclass
class Totals:
    """What an exploration covered (reported by the pytest summary and the runner)."""

    schedules: int = 0
    steps: int = 0
    calls: int = 0
    outcomes: int = 0
    seconds: float = 0.0


TOTALS = Totals()


def run_seed(seed: int, faults: Faults | None = None) -> Result:
    """Run one seeded schedule (counted in TOTALS)."""
    return counted(World(seed, faults=faults).run())


def counted(result: Result) -> Result:
    """Add a schedule's figures to TOTALS."""
    TOTALS.schedules += 1
    TOTALS.steps += result.steps
    TOTALS.calls += result.calls
    TOTALS.outcomes += result.outcomes
    return result
