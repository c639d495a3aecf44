"""The soak's world (bench/soak.py): the ledger of every write to the connection documents, the stand-in
integration-manager as the soak scripts it, and the platform's churn of connections.

The ledger is the soak's truth about the fleet: every token version (each value of `oauth.expiresAt`), when it was
written and replaced, and when a connection could not be refreshed (revoked, deleted, its grant refused). All writes
go through it: the seed, the churn (create, reconnect, revoke, delete) and integration-manager's refreshes (the
stand-in writes through `LedgerContainer`, which keeps each connection's expiry form and records the refresh with the
call's Idempotency-Key). Each write is etag-guarded and recorded under the connection's lock, so the ledger's order
is Cosmos's.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from bench.soak_figures import TokenVersion, Window
from bench.soak_plan import Connection, Fault, format_expiry
from localdev.stand_in_manager import Answer, Call, StandInManager

FOREVER = float("inf")


@dataclass
class ConnectionState:
    """A connection as the platform has it now."""

    connection: Connection
    form: str
    status: str = "active"
    deleted: bool = False
    refused_grant: str | None = None  # "400" or "200_failure_body" while integration-manager refuses its grant
    version: TokenVersion | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class RefreshRecord:
    """One refreshing write of integration-manager: the connection, the call's Idempotency-Key, the expiry it
    replaced (epoch ms) and when."""

    connection_id: str
    idempotency_key: str | None
    replaced_expiry_ms: int | None
    at: float


class Ledger:
    """Every token version and every time a connection could not be refreshed (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: dict[str, ConnectionState] = {}
        self.versions: list[TokenVersion] = []
        self.refreshes: list[RefreshRecord] = []
        self._blocked: dict[str, list[list[Any]]] = defaultdict(list)  # [start, end, kind]
        self.churn: dict[str, list[tuple[float, str]]] = defaultdict(list)

    def add(self, connection: Connection) -> ConnectionState:
        """A new connection (seeded or created)."""
        with self._lock:
            state = self.states[connection.connection_id] = ConnectionState(connection, connection.form)
            return state

    def state(self, connection_id: str | None) -> ConnectionState | None:
        """The connection's state, None for one the platform never had."""
        return self.states.get(connection_id or "")

    def write_version(self, state: ConnectionState, value: Any, instant: float, by: str, at: float) -> TokenVersion:
        """A new `oauth.expiresAt` was written (call with the connection's lock held, after the write succeeded)."""
        connection = state.connection
        version = TokenVersion(connection.connection_id, connection.integration_id, instant, at, by, value)
        with self._lock:
            if state.version is not None and state.version.ended_at is None:
                state.version.ended_at, state.version.ended_by = at, by
            state.version = version
            self.versions.append(version)
        return version

    def record_refresh(self, state: ConnectionState, key: str | None, replaced: TokenVersion | None, at: float) -> None:
        """integration-manager refreshed the connection (after write_version)."""
        replaced_ms = int(replaced.expires_at * 1000) if replaced is not None else None
        with self._lock:
            self.refreshes.append(RefreshRecord(state.connection.connection_id, key, replaced_ms, at))

    def block(self, connection_id: str, kind: str, at: float) -> None:
        """From `at` integration-manager would not refresh the connection (`kind`: revoked, deleted, grant refused)."""
        with self._lock:
            self._blocked[connection_id].append([at, FOREVER, kind])

    def unblock(self, connection_id: str, at: float) -> None:
        """A reconnect: the connection is refreshable again."""
        with self._lock:
            for window in self._blocked[connection_id]:
                if window[1] == FOREVER:
                    window[1] = at

    def note_churn(self, connection_id: str, kind: str, at: float) -> None:
        """A documented reason for a request of this connection to end with no outcome (revoked, deleted,
        reconnected)."""
        with self._lock:
            self.churn[connection_id].append((at, kind))

    def not_refreshable(self) -> dict[str, list[Window]]:
        """Per connection, when integration-manager would not have refreshed it."""
        with self._lock:
            return {key: [Window(s, e, k) for s, e, k in windows] for key, windows in self._blocked.items()}


def new_document(connection: Connection, value: Any, stamp: str) -> dict[str, Any]:
    """A connection document as the platform stores it."""
    return {
        "id": connection.connection_id,
        "tenantId": connection.tenant_id,
        "integrationId": connection.integration_id,
        "status": "active",
        "oauth": {"accessToken": f"at-{stamp}", "refreshToken": f"rt-{stamp}", "expiresAt": value},
    }


class Platform:
    """The platform's own writes to the connection documents: the seed and the churn."""

    def __init__(self, container: Any, ledger: Ledger, log: Callable[[str], None]):
        self.container = container
        self.ledger = ledger
        self.log = log
        self.failed_actions: list[str] = []

    def seed(self, connection: Connection, now: float) -> None:
        """Store one connection of the initial fleet, its token expiring `lifetime_s` from now."""
        self._create(connection, now, "seed")

    def _create(self, connection: Connection, now: float, by: str) -> None:
        state = self.ledger.add(connection)
        value, instant = format_expiry(now + connection.lifetime_s, connection.form)
        with state.lock:
            self._retry(lambda: self.container.upsert_item(new_document(connection, value, f"{by}-{now}")))
            self.ledger.write_version(state, value, instant, by, time.time())

    def apply(self, kind: str, connection: Connection, answer: str | None = None) -> None:
        """One churn action of the plan (bench/soak_plan.Action)."""
        now = time.time()
        if kind == "create":
            self._create(connection, now, "create")
            return
        state = self.ledger.state(connection.connection_id)
        if state is None or state.deleted:
            return
        if kind == "break_grant":
            state.refused_grant = answer
            self.ledger.block(connection.connection_id, f"grant refused ({answer})", now)
            return
        with state.lock:
            if kind == "delete":
                self._retry(
                    lambda: self.container.delete_item(connection.connection_id, partition_key=connection.tenant_id)
                )
                at = time.time()
                state.deleted = True
                if state.version is not None and state.version.ended_at is None:
                    state.version.ended_at, state.version.ended_by = at, "delete"
                self.ledger.block(connection.connection_id, "deleted", at)
                self.ledger.note_churn(connection.connection_id, "deleted", at)
                return
            if kind == "revoke":
                self._retry(lambda: self._update(connection, status="revoked"))
                at = time.time()
                state.status = "revoked"
                self.ledger.block(connection.connection_id, "revoked", at)
                self.ledger.note_churn(connection.connection_id, "revoked", at)
                return
            if kind == "reconnect":
                value, instant = format_expiry(now + connection.lifetime_s, state.form)
                self._retry(lambda: self._update(connection, status="active", expires_at=value, stamp=str(now)))
                at = time.time()
                state.status, state.refused_grant = "active", None
                self.ledger.write_version(state, value, instant, "reconnect", at)
                self.ledger.unblock(connection.connection_id, at)
                self.ledger.note_churn(connection.connection_id, "reconnected", at)
                return
        raise ValueError(kind)

    def _update(self, connection: Connection, **changes: Any) -> None:
        document = self.container.read_item(connection.connection_id, partition_key=connection.tenant_id)
        document["status"] = changes["status"]
        if "expires_at" in changes:
            stamp = changes["stamp"]
            document["oauth"].update(
                expiresAt=changes["expires_at"], accessToken=f"at-re-{stamp}", refreshToken=f"rt-re-{stamp}"
            )
        self.container.replace_item(
            document["id"], document, etag=document["_etag"], match_condition=MatchConditions.IfNotModified
        )

    def _retry(self, write: Callable[[], Any], timeout: float = 120) -> Any:
        """The platform retries its own writes through a Cosmos outage (the soak's faults hit them too)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return write()
            except CosmosResourceNotFoundError:
                raise
            except AzureError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


# The stand-in integration-manager, scripted ------------------------------------------------------------------


class FaultBoard:
    """The integration-manager faults active now, and the actual window of every fault once applied."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[Fault] = []
        self.windows: list[tuple[Fault, float, float | None]] = []  # (fault, started, ended)

    @contextlib.contextmanager
    def running(self, fault: Fault, manager_fault: bool = True) -> Iterator[None]:
        """Record the fault's actual window; a manager fault is active for the manager's script meanwhile."""
        started = time.time()
        index = len(self.windows)
        with self._lock:
            self.windows.append((fault, started, None))
            if manager_fault:
                self._active.append(fault)
        try:
            yield
        finally:
            with self._lock:
                if manager_fault:
                    self._active.remove(fault)
                self.windows[index] = (fault, started, time.time())

    def active(self) -> list[Fault]:
        """The manager faults in force now."""
        with self._lock:
            return list(self._active)

    def active_kinds(self) -> list[str]:
        """The kinds of every fault running now (manager or not)."""
        with self._lock:
            return [fault.kind for fault, _, ended in self.windows if ended is None]


class SoakManager(StandInManager):
    """The stand-in integration-manager with the soak's script. A 200 that reports a failure (`{"success": false,
    ...}`) is answered as it is, leaving the document as it was; every other answer goes through the stand-in's own
    rules (a 2xx refreshes the document first). The call being answered is kept per handler thread, so that
    LedgerContainer can record its Idempotency-Key with the refresh."""

    def __init__(self, decide: Callable[[Call], Answer], container: Any, token_lifetime: timedelta):
        self._local = threading.local()
        super().__init__(script=lambda call: self._local.answer, container=container, token_lifetime=token_lifetime)
        self.decide = decide

    def answer(self, call: Call) -> Answer:
        """The soak's answer to one call (see the class docstring)."""
        self._local.call = call
        decided = self.decide(call)
        if 200 <= decided.status < 300 and isinstance(decided.body, dict) and decided.body.get("success") is False:
            return decided
        self._local.answer = decided
        return super().answer(call)

    def current_key(self) -> str | None:
        """The Idempotency-Key of the call this thread is answering."""
        call = getattr(self._local, "call", None)
        if call is None:
            return None
        return next((value for name, value in call.headers.items() if name.lower() == "idempotency-key"), None)


class LedgerContainer:
    """The Cosmos container as the stand-in manager sees it: reads pass through; a refresh's replace keeps the
    connection's expiry form, is etag-guarded (a concurrent revoke or reconnect wins; the manager then answers 503)
    and is recorded in the ledger."""

    def __init__(self, container: Any, ledger: Ledger):
        self.container = container
        self.ledger = ledger
        self.manager: SoakManager | None = None

    def read_item(self, item: str, partition_key: Any, **kwargs: Any) -> dict[str, Any]:
        """The document, as Cosmos has it."""
        return self.container.read_item(item, partition_key=partition_key, **kwargs)

    def replace_item(self, item: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The stand-in's refresh write, in the connection's expiry form, recorded."""
        state = self.ledger.state(item)
        if state is None:
            raise CosmosResourceNotFoundError(message="not a connection of the soak")
        written = datetime.fromisoformat(str(body["oauth"]["expiresAt"]).replace("Z", "+00:00")).timestamp()
        value, instant = format_expiry(written, state.form)
        body["oauth"]["expiresAt"] = value
        key = self.manager.current_key() if self.manager else None
        with state.lock:
            result = self.container.replace_item(
                item, body, etag=body.get("_etag"), match_condition=MatchConditions.IfNotModified, **kwargs
            )
            replaced = state.version
            self.ledger.write_version(state, value, instant, "refresh", time.time())
            self.ledger.record_refresh(state, key, replaced, time.time())
        return result


def manager_script(ledger: Ledger, board: FaultBoard, read_timeout_s: float, seed: int) -> Callable[[Call], Answer]:
    """How integration-manager answers each call: as the connection's state says (gone, revoked, grant refused),
    else as the active faults say, else 200 with a refresh."""
    rng = random.Random(seed)  # noqa: S311 - which calls of a timeout window time out
    rng_lock = threading.Lock()
    late = read_timeout_s + 1.5  # answered after the app stopped waiting

    def decide(call: Call) -> Answer:  # noqa: PLR0911 - one answer per rule
        state = ledger.state(call.connection_id)
        if state is None or state.deleted:
            return Answer(404, {"error": "connection_not_found"})
        if state.status != "active":
            return Answer(400, {"error": "connection_revoked"})
        if state.refused_grant == "400":
            return Answer(400, {"error": "invalid_grant", "error_description": "the grant was refused"})
        if state.refused_grant == "200_failure_body":
            return Answer(200, {"success": False, "error": "invalid_grant"})
        for fault in board.active():
            params = fault.params
            if fault.kind == "manager_5xx":
                return Answer(params["status"], {"error": "server_error"})
            if fault.kind == "manager_429" and call.integration_id == params["integration"]:
                return Answer(429, {"error": "rate_limited"}, headers={"Retry-After": str(params["retry_after_s"])})
            if fault.kind == "manager_all_connection_errors":
                return Answer(params["status"], {"error": params["error"]})
            if fault.kind == "manager_timeouts":
                with rng_lock:
                    times_out, refreshed = rng.random() < params["share"], rng.random() < params["refreshed_share"]
                if times_out and refreshed:
                    return Answer(200, delay_s=late)  # refreshes, then answers too late
                if times_out:
                    return Answer(504, {"error": "gateway_timeout"}, delay_s=late)
        return Answer()

    return decide
