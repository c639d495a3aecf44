"""Explicit scenarios, one per finding of the simulation (docs/simulation.md): the smallest setup that reaches it.
Each is run over a few seeds (the interleavings of its few actors); a fixed protocol passes every one. (F7 has no
scenario yet: its random-exploration seed stands for it, tests/unit/simulation/test_found_defects.py.)"""

from __future__ import annotations

from collections.abc import Callable

from .world import CLAIM_WRITE, NO_FAULTS, Faults, Result, Scenario, World, counted

ONE_CONNECTION = [("conn-0", "github", 3000.0)]


def _scenario(**fields: object) -> Scenario:
    base: dict[str, object] = {
        "connections": list(ONE_CONNECTION),
        "retry_scheduler": True,
        "failure_metadata": False,
        "answers": {"ok": 1},
        "faults": Faults(**vars(NO_FAULTS)),
        "world_events": [],
    }
    return Scenario(**(base | fields))  # type: ignore[arg-type]


def take_over_window_shorter_than_the_holders_calls() -> Scenario:
    """D1. No retry scheduler. Delivery 1 gets a 504 (the call may still run): RETRY_PENDING with an in-flight window,
    redelivered at once. Delivery 2 takes the claim (callsUntil = now + budget + timeouts + in-flight), first waits
    out the in-flight window (60 s), and only then starts its own 60-s budget: a 429 (Retry-After 50 s), then a call
    that runs as long as the app allows (read timeout + in-flight). Its lock is lost during the first wait, and it dies
    as its last call times out, before it can record the in-flight window: delivery 3 waits only for callsUntil and
    calls while delivery 2's last call still runs at integration-manager."""
    return _scenario(
        retry_scheduler=False,
        script=["504", "429_50", "timeout_max", "ok"],
        at_label=[("", 2, "sleep 6", "lose_lock", 0.0), ("", 2, CLAIM_WRITE, "crash", 0.0)],
    )


def former_holder_overwrites_the_successors_claim() -> Scenario:
    """D2. Delivery 1 loses its lock as it calls; its call fails for good, then the process stalls (a long pause,
    within the function timeout) for 200 s before it publishes. Delivery 2 takes the claim over once delivery 1's
    calls window has passed (155 s) and calls (a 429, then waits 50 s). Delivery 1 wakes, publishes and writes its
    claim without an etag over delivery 2's live claim (StateStore.finish_claim)."""
    return _scenario(
        script=["invalid_grant", "429_50", "ok"],
        at_label=[("", 1, "manager.call", "lose_lock", 0.0), ("", 1, "publish", "freeze", 200.0)],
    )


def skipped_claim_is_terminal() -> Scenario:
    """D3. A transient failure, the connection disabled while the delivery backs off (the retry finds it disabled:
    SKIPPED), re-enabled later. The next check requests it again with the same request id: "already handled", no
    call and no outcome, while its token runs out."""
    return _scenario(
        script=["503", "ok"],
        world_events=[(0.3, "disable", "conn-0"), (1200.0, "enable", "conn-0")],
    )


def manager_failure_metadata_defeats_suppression() -> Scenario:
    """D5. integration-manager answers invalid_grant and records the failure in the connection document (like Nango's
    setRefreshFailure), which changes `_ts`. The failure record keeps the `_ts` read before the call, so it never
    matches: the next check asks again (and every check after it)."""
    return _scenario(script=["invalid_grant", "invalid_grant"], failure_metadata=True)


def two_successors_take_over_one_claim() -> Scenario:
    """F6. A 504 schedules a copy of the request; the copy's lock is lost as it starts, so the queue hands the copy
    to a second invocation too. Both see the claim as left by an earlier delivery of the chain, and both take it
    over (`take_over_live_lease`), the second over the first's live claim: two calls at once."""
    return _scenario(script=["504", "timeout_max", "ok", "ok"], at_label=[(".retry-0.1", 1, "state.", "lose_lock", 0)])


def second_call_after_a_published_outcome() -> Scenario:
    """F8. The outcome (invalid_grant) is published, then the claim write fails (a Cosmos 503): the delivery schedules
    a copy as after any outage, the claim stays in progress without the outcome, and the copy calls
    integration-manager again and publishes a second, different outcome for the same request."""
    return _scenario(
        script=["invalid_grant", "401"],
        at_label=[("", 1, CLAIM_WRITE, "fault", 0.0)],
    )


FINDINGS: dict[str, Callable[[], Scenario]] = {
    "D1": take_over_window_shorter_than_the_holders_calls,
    "D2": former_holder_overwrites_the_successors_claim,
    "D3": skipped_claim_is_terminal,
    "D5": manager_failure_metadata_defeats_suppression,
    "F6": two_successors_take_over_one_claim,
    "F8": second_call_after_a_published_outcome,
}
SEEDS_PER_SCENARIO = 20


def run_scenario(name: str, seed: int) -> Result:
    """Run the named finding's scenario with one seed (a fresh scenario each time: scripted faults fire once)."""
    return counted(World(seed, FINDINGS[name]()).run())
