"""integration-manager's stand-in: `refresh_connection` as a call with a duration on the virtual clock, answering
from a seeded script. Outcomes are built with the app's own classifier (shared.failure_classes, shared.manager_client)
so they are what the real client returns. A call goes on at the manager after the client gave up (a read timeout):
it may still refresh, which is what the app's in-flight window is about (docs/failure-handling.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from shared.failure_classes import classify
from shared.manager_client import RefreshOutcome, failed
from shared.times import format_time

from .scheduler import Scheduler

TOKEN_LIFETIME_S = 2 * 3600  # a refreshed token: due again only after the next check's threshold

# Scripted answers and their weights (a scenario may reweigh them).
ANSWERS: dict[str, int] = {
    "ok": 40,
    "ok_slow": 5,  # a 200 after up to 25 s: overlaps other actors' steps
    "ok_no_expiry": 4,  # a 200 without expiresAt in the body: verified by re-reading the document
    "ok_unverified": 2,  # a 200 that did not move the expiry
    "429": 6,
    "503": 6,
    "504": 4,  # a gateway gave up: the call goes on, may refresh (may_be_in_flight)
    "timeout_refreshed": 4,
    "timeout": 4,
    "network": 3,  # refused: never reached the manager
    "409": 3,
    "invalid_grant": 4,
    "404": 2,
    "401": 2,
}
RETRY_AFTERS_S = (1.0, 5.0, 30.0, 50.0, 120.0)
SCRIPTED_RETRY_AFTER = {"429_50": 50.0}  # scripted answers with a fixed Retry-After


@dataclass
class Call:
    """One call as the manager saw it."""

    number: int
    connection_id: str
    key: str | None
    version: tuple[str, str] | None  # the request's (connection, expiresAt), from its Idempotency-Key
    answer: str
    start: float
    server_end: float
    client_end: float
    refreshes: bool
    refreshed: bool = False
    actor: str = ""


class Manager:
    """The stand-in. `script(connection_id) -> answer` picks each call's answer; `on_call_start` and `on_refresh`
    let the world check its invariants; `write_failure_metadata` makes a connection-class failure write into the
    connection document (like Nango's setRefreshFailure), which changes its `_ts`."""

    location = "https://integration-manager.simulated"  # the client's, for the app's log lines

    def __init__(
        self,
        sim: Scheduler,
        read_timeout_s: float,
        in_flight_s: float,
        script: Callable[[str], str],
        read_doc: Callable[[str], dict | None],
        write_doc: Callable[[dict], None],
        version_of: Callable[[str | None], tuple[str, str] | None],
        *,
        write_failure_metadata: bool = False,
    ) -> None:
        self.sim, self.read_timeout_s, self.in_flight_s = sim, read_timeout_s, in_flight_s
        self.script, self.read_doc, self.write_doc, self.version_of = script, read_doc, write_doc, version_of
        self.write_failure_metadata = write_failure_metadata
        self.calls: list[Call] = []
        self.on_call_start: Callable[[Call], None] = lambda call: None
        self.on_refresh: Callable[[Call], None] = lambda call: None

    def refresh_connection(
        self, integration_id: str, connection_id: str, tenant_id: str, idempotency_key: str | None = None
    ) -> RefreshOutcome:
        """One call: a yield point before it is sent, then the client waits for the answer (or its read timeout)."""
        sim = self.sim
        sim.point(f"manager.call {connection_id}")
        answer = self.script(connection_id)
        rng = sim.rng
        if answer == "network":
            server, client = 0.0, 0.01
        elif answer in ("timeout", "timeout_refreshed"):
            server = self.read_timeout_s + rng.uniform(0.0, self.in_flight_s)
            client = self.read_timeout_s
        elif answer == "timeout_max":  # runs on for the whole in-flight window the app allows for
            server = self.read_timeout_s + self.in_flight_s
            client = self.read_timeout_s
        elif answer == "504":  # the gateway gives up; the manager goes on for at most the in-flight window
            client = rng.uniform(5.0, 30.0)
            server = client + rng.uniform(0.0, self.in_flight_s)
        elif answer == "ok_slow":
            server = client = rng.uniform(3.0, 25.0)
        else:
            server = client = rng.uniform(0.05, 2.0)
        client = min(client, server) if answer not in ("timeout", "timeout_refreshed", "timeout_max", "504") else client
        refreshes = answer in ("ok", "ok_slow", "ok_no_expiry", "timeout_refreshed") or (
            answer == "504" and rng.random() < 0.5
        )
        actor = sim.current()
        if actor is not None:
            actor.calls += 1
        call = Call(
            len(self.calls),
            connection_id,
            idempotency_key,
            self.version_of(idempotency_key),
            answer,
            sim.now,
            sim.now + server,
            sim.now + client,
            refreshes,
            actor=actor.name if actor else "",
        )
        sim.log(call.actor, f"manager call #{call.number} {connection_id} answer={answer} server={server:.1f}s")
        self.on_call_start(call)
        self.calls.append(call)
        if answer != "network":
            sim.at(call.server_end, f"manager #{call.number} done", lambda: self._server_done(call))
        sim.sleep(client, f"manager.wait #{call.number}")
        new_expiry = None
        if call.refreshed and answer != "ok_no_expiry":
            doc = self.read_doc(connection_id)
            new_expiry = (doc or {}).get("oauth", {}).get("expiresAt")
        retry_after = SCRIPTED_RETRY_AFTER.get(answer, rng.choice(RETRY_AFTERS_S))
        return self._outcome(
            answer.partition("_")[0] if answer in SCRIPTED_RETRY_AFTER else answer, new_expiry, retry_after
        )

    def _server_done(self, call: Call) -> None:
        doc = self.read_doc(call.connection_id)
        if doc is None or str(doc.get("status", "")).lower() in ("revoked", "deleted", "disabled"):
            return  # the manager refuses a connection that is gone
        if call.refreshes:
            expiry = datetime.fromtimestamp(self.sim.now + TOKEN_LIFETIME_S, UTC)
            doc.setdefault("oauth", {})["expiresAt"] = format_time(expiry)
            doc.pop("refreshFailure", None)
            self.write_doc(doc)
            call.refreshed = True
            self.on_refresh(call)
        elif call.answer in ("invalid_grant", "404") and self.write_failure_metadata:
            doc["refreshFailure"] = {"at": self.sim.now, "code": call.answer}
            self.write_doc(doc)

    @staticmethod
    def _outcome(answer: str, new_expiry: str | None, retry_after: float) -> RefreshOutcome:
        if answer in ("ok", "ok_slow", "ok_no_expiry", "ok_unverified"):
            from shared.times import parse_expires_at

            return RefreshOutcome(
                True, http_status=200, expires_at=parse_expires_at(new_expiry) if new_expiry else None
            )
        if answer in ("timeout", "timeout_refreshed", "timeout_max"):
            return failed("timeout", "integration-manager did not answer in time", may_be_in_flight=True)
        if answer == "network":
            return failed("network_error", "could not reach integration-manager (ConnectionError)")
        status, code = {
            "429": (429, None),
            "503": (503, None),
            "504": (504, None),
            "409": (409, "refresh_in_progress"),
            "invalid_grant": (400, "invalid_grant"),
            "404": (404, "connection_not_found"),
            "401": (401, None),
        }[answer]
        row = classify(status, code)
        outcome = RefreshOutcome(
            False,
            http_status=status,
            error_code=code or row.default_code,
            error_message=f"integration-manager answered HTTP {status}" + (f" ({code})" if code else ""),
            kind=row.kind,
            check=row.check,
        )
        if outcome.transient:  # as IntegrationManagerClient.refresh_connection does
            outcome = replace(
                outcome, retry_after_s=retry_after if status == 429 else None, may_be_in_flight=status in (502, 504)
            )
        return outcome
