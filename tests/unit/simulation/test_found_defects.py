"""Findings of the simulation not fixed yet in shared/ (docs/simulation.md): each an expected failure (strict
xfail, so the suite stays green) until its fix, which turns it into an unexpected pass: then drop its mark.

Two kinds, both run on the real app code:
- an explicit scenario per finding (tests/unit/simulation/scenarios.py) over a few seeds, which interleave its few
  actors differently: robust to changes of the code around it;
- the random-exploration seeds that first showed it, with the faults that reach it (a replay: after other changes the
  same seed may explore another path, so these can start passing without a fix -- the scenario is the real test).

Once a finding is fixed, its switch in CI_FAULTS (tests/unit/simulation/world.py) goes back to the default and its
seeds move to REGRESSIONS in test_simulation.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.simulation.scenarios import FINDINGS, SEEDS_PER_SCENARIO, run_scenario
from tests.unit.simulation.world import CI_FAULTS, run_seed

# What each finding is, for the xfail reason (docs/simulation.md has the code paths).
OPEN = {
    "D1": "the take-over window (callsUntil) is shorter than the holder's waits and calls",
    "D2": "finish_claim/mark_published write without an etag over a successor's claim",
    "D3": "a request ended by a disable blocks the same request after re-enabling (SKIPPED is terminal)",
    "D5": "permanent-failure suppression keyed to the _ts read before the call",
    "F6": "a take-over is not bound to the holder it waited for: two successors both take the claim",
    "F7": "a paced request without a retry scheduler is dead-lettered without an outcome",
    "F8": "an outage or crash between publishing an outcome and recording it calls the manager again",
}


def _open(finding: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"finding {finding} not fixed yet: {OPEN[finding]}")


@pytest.mark.parametrize("finding", [pytest.param(f, marks=_open(f)) for f in sorted(FINDINGS)])
def test_finding_scenario_keeps_every_invariant(finding: str) -> None:
    results = [run_scenario(finding, seed) for seed in range(SEEDS_PER_SCENARIO)]
    failing = [r for r in results if r.violations or r.aborted]
    assert not failing, (
        f"{finding}: {len(failing)} of {SEEDS_PER_SCENARIO} interleavings break an invariant "
        f"(python -m tests.unit.simulation --scenario {finding} --seed {failing[0].seed}):\n{failing[0].report()}"
    )


# (finding, seed, the CI_FAULTS switch widened to reach it) -- found by the random exploration on 729675b's shared/.
SEEDS = [
    ("D3", 952, {"reenable": True}),  # a retry skipped at its start (disabled); re-enabled; next request dropped
    ("D5", 82, {"failure_metadata": 0.3}),
    ("F6", 46, {"lock_lost": 0.01, "duplicate": 0.05}),  # a scheduled copy takes over a live redelivery's claim
    ("F6", 828, {"lock_lost": 0.01, "duplicate": 0.05}),  # two calls in flight
    ("F7", 1173, {"paced_without_scheduler": True}),
    ("F8", 615, {"faults_after_outcome": True}),
]


@pytest.mark.parametrize(
    ("finding", "seed", "widened"),
    [pytest.param(*entry, marks=_open(entry[0]), id=f"{entry[0]}-seed{entry[1]}") for entry in SEEDS],
)
def test_finding_seed_keeps_every_invariant(finding: str, seed: int, widened: dict[str, object]) -> None:
    result = run_seed(seed, replace(CI_FAULTS, **widened))  # type: ignore[arg-type]
    assert not (result.violations or result.aborted), f"{finding}:\n{result.report()}"
