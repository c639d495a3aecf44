"""What the soak (bench/soak.py) will do, drawn from one seed before anything runs: the fleet, the expiry formats,
the churn of connections and the fault schedule. Printed at the start so that any failure replays with `--seed`.

Times in a plan are seconds from the start of the run (when the first host starts).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# Integrations of the fleet, their share of it and their rate limit (None: not limited). Their sum of limits is
# ~3x the fleet's steady refresh rate (docs/scale.md#the-soak): room for the backlog after a fault.
INTEGRATIONS: dict[str, tuple[float, float | None]] = {
    "salesforce": (0.25, 4.0),
    "hubspot": (0.20, 3.0),
    "google": (0.20, 8.0),
    "xero": (0.10, 2.0),
    "slack": (0.25, None),
}


def rate_limits_setting() -> str:
    """TOKEN_REFRESH_RATE_LIMITS for the fleet's limited integrations, e.g. `salesforce=4/s,...`."""
    return ",".join(f"{name}={limit:g}/s" for name, (_, limit) in INTEGRATIONS.items() if limit)


def rate_limits() -> dict[str, float]:
    """Each limited integration's limit in calls per second."""
    return {name: limit for name, (_, limit) in INTEGRATIONS.items() if limit}


# Every expiry form docs/settings.md accepts ("Which connections are refreshed").
FORMATS = (
    "iso0_z",  # 2026-12-06T05:31:28Z
    "iso3_z",  # 2026-12-06T05:31:28.123Z
    "iso4_z",  # 2026-12-06T05:31:28.1234Z
    "iso6_utc_offset",  # 2026-12-06T05:31:28.123456+00:00 (Python's isoformat())
    "iso7_z",  # 2026-12-06T05:31:28.1234567Z (.NET)
    "iso3_utc_offset",  # 2026-12-06T05:31:28.123+00:00
    "iso3_lower_t_z",  # 2026-12-06t05:31:28.123z
    "iso3_space",  # 2026-12-06 05:31:28.123Z
    "iso3_other_offset",  # 2026-12-06T11:01:28.123+05:30
    "epoch_ms",  # 1796535088123
    "epoch_ms_fraction",  # 1796535088123.5
    "epoch_s",  # 1796535088
)


def format_expiry(moment: float, form: str) -> tuple[Any, float]:
    """`moment` (epoch seconds) written in `form`, and the instant that value stands for (cut to its precision)."""
    utc = datetime.fromtimestamp(moment, UTC)
    micros = utc.microsecond
    if form == "epoch_ms":
        value = int(moment * 1000)
        return value, value / 1000
    if form == "epoch_ms_fraction":
        value = int(moment * 1000) + 0.5
        return value, value / 1000
    if form == "epoch_s":
        value = int(moment)
        return value, float(value)
    digits = {"iso0_z": 0, "iso4_z": 4, "iso6_utc_offset": 6, "iso7_z": 6}.get(form, 3)
    kept = micros - micros % 10 ** (6 - digits)
    cut = utc.replace(microsecond=kept)
    fraction = f".{kept:06d}"[: digits + 1] if digits else ""
    if form == "iso7_z":
        fraction += "7"  # a 7th digit (100 ns): the instant read is the same microsecond
    if form == "iso3_other_offset":
        local = cut.astimezone(timezone_0530())
        text = local.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "+05:30"
    else:
        text = cut.strftime("%Y-%m-%dT%H:%M:%S") + fraction
        text += {"iso6_utc_offset": "+00:00", "iso3_utc_offset": "+00:00"}.get(form, "Z")
    if form == "iso3_lower_t_z":
        text = text.replace("T", "t").replace("Z", "z")
    if form == "iso3_space":
        text = text.replace("T", " ")
    return text, cut.timestamp()


def timezone_0530() -> Any:
    """UTC+05:30."""
    from datetime import timezone

    return timezone(timedelta(hours=5, minutes=30))


# The plan ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """One connection of the fleet as first stored: its ids, expiry form and first token lifetime (s)."""

    connection_id: str
    tenant_id: str
    integration_id: str
    form: str
    lifetime_s: float


@dataclass(frozen=True)
class Action:
    """A change the platform makes to a connection while the soak runs: create, reconnect (a new token and expiry,
    status active, a refused grant healed), revoke (status revoked), delete; or break_grant (integration-manager
    refuses the connection's grant from now on, `answer` 400 invalid_grant or 200 with a failure body, until a
    reconnect)."""

    at: float
    kind: str
    connection: Connection
    answer: str | None = None  # break_grant: "400" or "200_failure_body"


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule, from `at` for `duration` seconds (a RabbitMQ restart and a host kill last as long
    as they take)."""

    at: float
    duration: float
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    systemic: bool = False  # an alarm is expected while it lasts

    def describe(self) -> str:
        """One line of the printed schedule."""
        params = " ".join(f"{key}={value}" for key, value in self.params.items())
        alarm = "  [systemic: alarm expected]" if self.systemic else ""
        return f"t={self.at:7.1f}s  {self.duration:5.1f}s  {self.kind:<30} {params}{alarm}"


# Fault classes by layer: faults of one layer run one after the other, layers overlap.
MANAGER_FAULTS = ("manager_5xx", "manager_429", "manager_timeouts", "manager_down", "manager_all_connection_errors")
COSMOS_FAULTS = ("cosmos_blip_500", "cosmos_blip_429")
INFRA_FAULTS = ("rabbitmq_restart", "host_kill", "two_hosts")
ALL_FAULT_CLASSES = (*MANAGER_FAULTS, *COSMOS_FAULTS, *INFRA_FAULTS, "grant_refused_400", "grant_refused_200_body")
# Two systemic faults of one signature inside TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS would be one alarm.
SYSTEMIC_SPACING_S = 75.0


@dataclass
class Plan:
    """Everything one seed decides."""

    seed: int
    duration_s: float
    warmup_s: float
    drain_s: float
    fleet: list[Connection]
    actions: list[Action]
    faults: list[Fault]
    left_out: list[str]

    @property
    def active_end(self) -> float:
        """When faults and churn stop and the drain begins."""
        return self.duration_s - self.drain_s

    def describe(self) -> list[str]:
        """The printed plan: settings of the run, every fault, the churn."""
        counts: dict[str, int] = {}
        for action in self.actions:
            counts[action.kind] = counts.get(action.kind, 0) + 1
        lines = [
            f"seed {self.seed}; {len(self.fleet)} connections; {self.duration_s:g} s: warm-up {self.warmup_s:g} s, "
            f"faults and churn until t={self.active_end:g}s, then a drain of {self.drain_s:g} s with no faults",
            "fault schedule:",
            *(f"  {fault.describe()}" for fault in self.faults),
        ]
        if self.left_out:
            lines.append(f"  (no room in this run for: {', '.join(self.left_out)}; a longer --duration has them)")
        lines.append("churn: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
        lines.extend(
            f"  t={action.at:7.1f}s  {action.kind:<12} {action.connection.connection_id}"
            + (f" ({action.answer})" if action.answer else "")
            for action in self.actions
        )
        return lines

    def to_json(self) -> dict[str, Any]:
        """The plan for soak-results.json."""
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "drain_s": self.drain_s,
            "faults": [asdict(fault) for fault in self.faults],
            "left_out": self.left_out,
            "actions": [
                {"at": a.at, "kind": a.kind, "connection": a.connection.connection_id, "answer": a.answer}
                for a in self.actions
            ],
        }


def _integration(rng: random.Random) -> str:
    return rng.choices(list(INTEGRATIONS), weights=[share for share, _ in INTEGRATIONS.values()])[0]


def _new_connection(rng: random.Random, connection_id: str, n: int, lifetime: tuple[float, float]) -> Connection:
    return Connection(
        connection_id, f"tenant-{n % 17}", _integration(rng), FORMATS[n % len(FORMATS)], rng.uniform(*lifetime)
    )


def _overlaps(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start < w_end and w_start < end for w_start, w_end in windows)


def _layer(
    rng: random.Random,
    kinds: tuple[str, ...],
    start: float,
    end: float,
    *,
    draw: Any,
    avoid: list[tuple[float, float]] | None = None,
    recovery: bool = False,
) -> tuple[list[Fault], set[str]]:
    """Faults of one layer, one after the other from `start`, a shuffled pass over `kinds` after another until
    `end`; a fault that would overlap `avoid` moves past it. With `recovery`, each fault is followed by at least as
    long without one (and at least 15 s): the backlog it leaves drains before the next (in production a minute's
    outage meets an hour's threshold; here the threshold is 90 s). Returns the faults and the kinds placed."""
    faults: list[Fault] = []
    placed: set[str] = set()
    moment = start + rng.uniform(0, 5)
    last_systemic = -1e9
    failures = 0
    while moment < end and failures < 20:
        progressed = False
        for kind in rng.sample(kinds, len(kinds)):
            fault = draw(rng, kind, moment, end)
            if fault is None:
                continue
            if fault.systemic and fault.at - last_systemic < SYSTEMIC_SPACING_S:
                continue
            window = (fault.at - 3, fault.at + fault.duration + 3)
            if avoid and _overlaps(*window, avoid):
                moment = max(w_end for w_start, w_end in avoid if _overlaps(*window, [(w_start, w_end)])) + 1
                continue
            faults.append(fault)
            placed.add(kind)
            progressed = True
            if fault.systemic:
                last_systemic = fault.at
            gap = max(15.0, fault.duration) * rng.uniform(1.0, 1.5) if recovery else rng.uniform(3, 10)
            moment = fault.at + fault.duration + gap
            if moment >= end:
                break
        failures = 0 if progressed else failures + 1
        if not progressed:
            moment += 5
    return faults, placed


def _draw_fault(rng: random.Random, kind: str, at: float, end: float) -> Fault | None:  # noqa: PLR0911
    """A fault of `kind` starting at `at`, if one fits before `end` (at its shortest: 5 s)."""
    room = end - at
    if room < 5:
        return None

    def length(low: float, high: float) -> float:
        return round(min(rng.uniform(low, high), room), 1)

    at = round(at, 1)
    if kind == "manager_5xx":
        return Fault(at, length(5, 20), kind, {"status": rng.choice([500, 502, 503])})
    if kind == "manager_429":
        integration = rng.choice([name for name, (_, limit) in INTEGRATIONS.items() if limit])
        return Fault(at, length(5, 20), kind, {"integration": integration, "retry_after_s": rng.choice([1, 2, 3])})
    if kind == "manager_timeouts":
        return Fault(at, length(8, 20), kind, {"share": 0.5, "refreshed_share": 0.5})
    if kind == "manager_down":
        return Fault(at, length(5, 15), kind)
    if kind == "manager_all_connection_errors":
        if room < 10:
            return None
        return Fault(at, length(10, 20), kind, {"status": 404, "error": "connection_not_found"}, systemic=True)
    if kind in COSMOS_FAULTS:
        return Fault(at, length(5, 60), kind, {"status": 500 if kind.endswith("500") else 429})
    if kind == "rabbitmq_restart":
        return Fault(at, 8.0, kind) if room >= 15 else None
    if kind == "host_kill":
        return Fault(at, round(rng.uniform(1, 5), 1), kind, {"signal": "SIGKILL"})
    if kind == "two_hosts":
        return Fault(at, length(20, 45), kind) if room >= 15 else None
    raise ValueError(kind)


def make_plan(
    seed: int,
    connections: int,
    duration_s: float,
    *,
    warmup_s: float = 10.0,
    drain_s: float | None = None,
    lifetime_s: tuple[float, float] = (120.0, 180.0),
    churn_per_s: float = 0.6,
) -> Plan:
    """The whole run from one seed: `connections` to seed, the churn and the faults between the warm-up and the
    drain (by default 30% of the run, at least 45 s and at most 90 s: outstanding retries finish)."""
    rng = random.Random(seed)  # noqa: S311 - a replayable schedule, not a secret
    drain = drain_s if drain_s is not None else max(45.0, min(90.0, 0.3 * duration_s))
    active_end = duration_s - drain
    fleet = [_new_connection(rng, f"soak-{n:05d}", n, (60.0, 180.0)) for n in range(connections)]

    # integration-manager and Cosmos (whose outage the manager answers with 503) are one layer: a fault of either
    # makes the manager refuse, and each is followed by time to recover.
    services, service_kinds = _layer(
        rng, MANAGER_FAULTS + COSMOS_FAULTS, warmup_s, active_end, draw=_draw_fault, recovery=True
    )
    infra, infra_kinds = _layer(rng, INFRA_FAULTS, warmup_s, active_end, draw=_draw_fault)
    faults = sorted(services + infra, key=lambda f: f.at)

    # The churn, simulated on the fleet's states so that each action names a connection it can apply to.
    active = {c.connection_id: c for c in fleet}
    revoked: dict[str, Connection] = {}
    broken: dict[str, Connection] = {}
    actions: list[Action] = []
    created = 0
    moment = warmup_s
    grant_kinds: set[str] = set()
    next_grant = warmup_s + rng.uniform(5, 20)
    while True:
        moment += rng.expovariate(churn_per_s)
        if moment >= active_end - 5:
            break
        at = round(moment, 1)
        if at >= next_grant and len(active) > 10:
            next_grant = at + rng.uniform(15, 35)
            for _ in range(rng.randint(2, 4)):
                target = active.pop(rng.choice(sorted(active)))
                answer = rng.choice(["400", "200_failure_body"])
                grant_kinds.add("grant_refused_400" if answer == "400" else "grant_refused_200_body")
                broken[target.connection_id] = target
                actions.append(Action(at, "break_grant", target, answer))
            continue
        kind = rng.choices(["create", "reconnect", "revoke", "delete"], weights=[35, 30, 20, 15])[0]
        if kind == "create":
            connection = _new_connection(rng, f"soak-new-{created:05d}", created, lifetime_s)
            created += 1
            active[connection.connection_id] = connection
            actions.append(Action(at, "create", connection))
        elif kind == "reconnect":
            pool = (revoked or broken) if (revoked or broken) and rng.random() < 0.6 else active
            if not pool:
                continue
            target = pool.pop(rng.choice(sorted(pool)))
            target = Connection(
                target.connection_id, target.tenant_id, target.integration_id, target.form, rng.uniform(*lifetime_s)
            )
            active[target.connection_id] = target
            actions.append(Action(at, "reconnect", target))
        else:
            if len(active) <= 10:
                continue
            target = active.pop(rng.choice(sorted(active)))
            if kind == "revoke":
                revoked[target.connection_id] = target
            actions.append(Action(at, kind, target))
    placed = service_kinds | infra_kinds | grant_kinds
    left_out = [kind for kind in ALL_FAULT_CLASSES if kind not in placed]
    return Plan(seed, duration_s, warmup_s, drain, fleet, actions, faults, left_out)
