"""The soak's figures (bench/soak.py), computed from what it recorded: pure functions over plain lists, so that
tests/unit/test_soak_figures.py can check the maths on hand-made data.

Times are epoch seconds (floats) throughout. What each figure means and how it is counted: docs/scale.md#the-soak.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# The goals of docs/scale.md#the-soak (never loosened here: a figure that misses one fails the soak).
GOALS = {
    "tokens_expired_while_refreshable": "== 0",
    "calls_per_token_lifetime": "== 1.00",
    "requests_without_outcome": "== 0",
    "pacing_max_10s_over_limit": "<= 1.10",
    "pacing_max_1s_excess_calls": "<= 1",
    "alarms_raised": ">= alarms_expected, one per systemic fault",
}


# Windows ---------------------------------------------------------------------------------------------------


def most_in_any_window(times: Iterable[float], window: float) -> int:
    """The most of `times` in any half-open window [t, t + window): the rate a limit is judged by."""
    ordered, most, start = sorted(times), 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


@dataclass(frozen=True)
class PacingFigure:
    """One rate-limited integration's calls against its limit."""

    integration_id: str
    limit_per_s: float
    calls: int
    max_1s: int
    max_10s: int

    @property
    def ratio_10s(self) -> float:
        """Most calls in any 10 s window / (limit * 10)."""
        return self.max_10s / (self.limit_per_s * 10)

    @property
    def excess_1s(self) -> float:
        """Most calls in any 1 s window minus the limit (calls over the limit in the worst second)."""
        return self.max_1s - self.limit_per_s


def pacing_figures(calls: Iterable[tuple[str, float]], limits: dict[str, float]) -> list[PacingFigure]:
    """Per rate-limited integration: every call it received ((integration id, time) pairs, retries and failed
    calls included: a provider counts them all) in its busiest 1 s and 10 s windows."""
    times: dict[str, list[float]] = defaultdict(list)
    for integration_id, moment in calls:
        times[integration_id].append(moment)
    return [
        PacingFigure(
            integration,
            limit,
            len(times[integration]),
            most_in_any_window(times[integration], 1.0),
            most_in_any_window(times[integration], 10.0),
        )
        for integration, limit in sorted(limits.items())
    ]


# Tokens that expired while refreshable ------------------------------------------------------------------------


@dataclass
class TokenVersion:
    """One value of a connection's `oauth.expiresAt`, from the write that set it (`written_at`) to the write that
    replaced it or the delete (`ended_at`, None while it is current)."""

    connection_id: str
    integration_id: str
    expires_at: float
    written_at: float
    written_by: str  # seed, create, reconnect, refresh
    value: object = None  # as stored (its format)
    ended_at: float | None = None
    ended_by: str | None = None


@dataclass(frozen=True)
class Window:
    """[start, end): a time when integration-manager was scripted to fail calls, for every connection
    (`integration_id` None) or one integration's. `kind` names the fault."""

    start: float
    end: float
    kind: str = ""
    integration_id: str | None = None


@dataclass
class ExpiryVerdicts:
    """What happened to every token version whose expiry passed during the observation."""

    expired: list[TokenVersion] = field(default_factory=list)  # passed while refreshable: the figure
    excused: list[tuple[TokenVersion, str]] = field(default_factory=list)  # the manager would have refused it
    refreshed_in_time: int = 0
    not_yet_due: int = 0


def available_stretches(start: float, end: float, failing: Iterable[Window]) -> list[tuple[float, float]]:
    """The stretches of [start, end] that none of the `failing` windows covers."""
    spans = sorted((max(w.start, start), min(w.end, end)) for w in failing if w.start < end and w.end > start)
    stretches, moment = [], start
    for span_start, span_end in spans:
        if span_start > moment:
            stretches.append((moment, span_start))
        moment = max(moment, span_end)
    if end > moment:
        stretches.append((moment, end))
    return stretches


def longest_available(start: float, end: float, failing: Iterable[Window]) -> float:
    """The longest stretch of [start, end] that none of the `failing` windows covers."""
    return max((b - a for a, b in available_stretches(start, end, failing)), default=0.0)


def ahead_at_the_limit(version: TokenVersion, moment: float, versions: list[TokenVersion], threshold_s: float) -> int:
    """How many other tokens of the version's integration were due and still current at `moment` and expire no
    later: the ones a correct app, calling soonest-expiring first at the integration's limit, serves before it."""
    return sum(
        1
        for other in versions
        if other is not version
        and other.integration_id == version.integration_id
        and other.expires_at <= version.expires_at
        and max(other.written_at, other.expires_at - threshold_s) <= moment
        and other.written_at <= moment
        and (other.ended_at is None or other.ended_at > moment)
    )


def expired_while_refreshable(
    versions: Iterable[TokenVersion],
    not_refreshable: dict[str, list[Window]],
    fault_windows: Iterable[Window],
    *,
    until: float,
    threshold_s: float,
    need_s: float,
    limits: dict[str, float] | None = None,
) -> ExpiryVerdicts:
    """Each token version whose expiry passed by `until` while it was still the connection's current token: counted,
    unless integration-manager would not have refreshed it. That is the case when, in the time the app had for it
    (from when it became due, `threshold_s` before its expiry or when it was written if later, to its expiry), the
    manager refused it all along but for stretches shorter than `need_s` (a check interval and a call): the
    connection was revoked, deleted or its grant refused (`not_refreshable`, per connection id), or a fault had the
    manager fail every call, or this integration's (`fault_windows`). A fault elsewhere in its time does not excuse a
    token the app could have refreshed before or after it. A version replaced (refreshed, reconnected) or deleted at
    or before its expiry was refreshed in time.

    With `limits` (calls per second by integration), a stretch counts only if it is long enough for the app to reach
    the token at its integration's limit as well: `need_s` plus the tokens ahead of it (ahead_at_the_limit) at the
    limit. After an outage, the tokens that became due meanwhile are all due at once, and no app may call faster."""
    verdicts = ExpiryVerdicts()
    windows = list(fault_windows)
    versions = list(versions)
    limits = limits or {}
    for version in versions:
        if version.expires_at > until:
            verdicts.not_yet_due += 1
            continue
        if version.ended_at is not None and version.ended_at <= version.expires_at:
            verdicts.refreshed_in_time += 1
            continue
        due = max(version.written_at, version.expires_at - threshold_s)
        failing = [
            *not_refreshable.get(version.connection_id, ()),
            *(w for w in windows if w.integration_id in (None, version.integration_id)),
        ]
        limit = limits.get(version.integration_id)

        def reachable(
            stretch: tuple[float, float], version: TokenVersion = version, limit: float | None = limit
        ) -> bool:
            start, end = stretch
            backlog_s = ahead_at_the_limit(version, start, versions, threshold_s) / limit if limit else 0.0
            return end - start >= need_s + backlog_s

        if not any(reachable(stretch) for stretch in available_stretches(due, version.expires_at, failing)):
            kinds = sorted({w.kind for w in failing if w.start < version.expires_at and w.end > due})
            verdicts.excused.append((version, "+".join(kinds) or "written too close to its expiry"))
        else:
            verdicts.expired.append(version)
    return verdicts


# Calls per token lifetime -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshWrite:
    """One write of integration-manager that refreshed a connection: the call's Idempotency-Key and the token
    version the refresh was for (connection id, its expiry in epoch ms)."""

    token_version: tuple[str, int]
    idempotency_key: str | None


@dataclass(frozen=True)
class CallsPerLifetime:
    """Refreshes per token version: distinct Idempotency-Keys that refreshed it (`figure`), and writes (`raw`)."""

    versions: int
    keys: int
    writes: int
    refreshed_more_than_once: list[tuple[str, int]]

    @property
    def figure(self) -> float:
        """Distinct refreshing Idempotency-Keys per refreshed token version (1.00: each refreshed once)."""
        return self.keys / self.versions if self.versions else 1.0

    @property
    def raw(self) -> float:
        """Refreshing writes per token version, repeated keys counted each time."""
        return self.writes / self.versions if self.versions else 1.0


def calls_per_token_lifetime(writes: Iterable[RefreshWrite]) -> CallsPerLifetime:
    """Of the refreshing writes, how many distinct Idempotency-Keys refreshed each token version. Retries of one
    request carry its key and count once (integration-manager answers a repeated key with the first call's result,
    docs/failure-handling.md); a new round (`<id>.<n>`), or a request with another id, is another refresh of the
    same token and counts again. A write without a key counts as a key of its own."""
    keys: dict[tuple[str, int], set[str]] = defaultdict(set)
    count = 0
    for n, write in enumerate(writes):
        count += 1
        keys[write.token_version].add(write.idempotency_key or f"(no key #{n})")
    twice = sorted(version for version, seen in keys.items() if len(seen) > 1)
    return CallsPerLifetime(len(keys), sum(len(seen) for seen in keys.values()), count, twice)


# Requests without an outcome -------------------------------------------------------------------------------


@dataclass
class RequestSeen:
    """A refresh request on the exchange (every copy of one id): when it was first seen, its highest attempt round,
    and the time its first copy was scheduled for (`notBefore`; later checks may publish it again, later)."""

    request_id: str
    connection_id: str
    first_seen: float
    max_round: int = 0
    not_before: float | None = None


@dataclass
class RequestVerdicts:
    """Every refresh request: with an outcome event, without one but for a documented reason, pending when the soak
    ended, or without either (the figure)."""

    with_outcome: int = 0
    documented: list[tuple[RequestSeen, str]] = field(default_factory=list)
    pending_at_end: list[RequestSeen] = field(default_factory=list)
    without_outcome: list[RequestSeen] = field(default_factory=list)


def requests_without_outcome(
    requests: Iterable[RequestSeen],
    outcome_ids: set[str],
    *,
    outcome_id: Callable[[str, int, str], str],
    outcome_types: tuple[str, ...],
    churn: dict[str, list[tuple[float, str]]],
    cutoff: float,
    reason_slack_s: float = 10.0,
) -> RequestVerdicts:
    """Sort every request: an outcome event (`refreshed`/`refresh.failed`, the deterministic id `outcome_id(request id,
    round, type)` of any of its rounds) was seen; else the soak changed the connection (`churn`: revoked, deleted,
    reconnected — each a documented reason to skip it) after it was requested (`reason_slack_s` before: the check
    read the connection before publishing); else it was first seen, or scheduled, after `cutoff` (too late to finish
    before the soak stopped); else it is counted."""
    verdicts = RequestVerdicts()
    for request in requests:
        rounds = range(request.max_round + 3)  # a later check may have asked again in rounds not seen on the tap
        if any(outcome_id(request.request_id, n, kind) in outcome_ids for n in rounds for kind in outcome_types):
            verdicts.with_outcome += 1
            continue
        reason = next(
            (
                why
                for moment, why in churn.get(request.connection_id, ())
                if moment >= request.first_seen - reason_slack_s
            ),
            None,
        )
        if reason:
            verdicts.documented.append((request, reason))
        elif request.first_seen > cutoff or (request.not_before or 0) > cutoff:
            verdicts.pending_at_end.append(request)
        else:
            verdicts.without_outcome.append(request)
    return verdicts


# Alarms -------------------------------------------------------------------------------------------------------


def alarms_matched(systemic_faults: Iterable[Window], alarm_times: Iterable[float]) -> list[tuple[Window, bool]]:
    """Each systemic fault injected, and whether a systemic-failure alarm was seen while it lasted (its window, which
    the caller extends by its recovery grace)."""
    moments = sorted(alarm_times)
    return [(fault, any(fault.start <= moment < fault.end for moment in moments)) for fault in systemic_faults]


# Goals --------------------------------------------------------------------------------------------------------


def missed_goals(figures: dict[str, float | int], alarms_all_matched: bool) -> list[str]:
    """The goals a run missed, each as `name = value (goal ...)`."""
    missed = []
    if figures["tokens_expired_while_refreshable"] != 0:
        missed.append(f"tokens_expired_while_refreshable = {figures['tokens_expired_while_refreshable']} (goal 0)")
    if round(figures["calls_per_token_lifetime"], 2) != 1.0:
        missed.append(f"calls_per_token_lifetime = {figures['calls_per_token_lifetime']:.3f} (goal 1.00)")
    if figures["requests_without_outcome"] != 0:
        missed.append(f"requests_without_outcome = {figures['requests_without_outcome']} (goal 0)")
    if figures["pacing_max_10s_over_limit"] > 1.10:
        missed.append(f"pacing_max_10s_over_limit = {figures['pacing_max_10s_over_limit']:.2f} (goal <= 1.10)")
    if figures["pacing_max_1s_excess_calls"] > 1:
        missed.append(f"pacing_max_1s_excess_calls = {figures['pacing_max_1s_excess_calls']:g} (goal <= 1)")
    if figures["alarms_raised"] < figures["alarms_expected"] or not alarms_all_matched:
        missed.append(
            f"alarms_raised = {figures['alarms_raised']} against alarms_expected = {figures['alarms_expected']} "
            "(goal: an alarm during every systemic fault injected)"
        )
    return missed
