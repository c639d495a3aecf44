"""Findings of the simulation (docs/simulation.md): those not fixed yet in shared/ are expected failures (strict
xfail, so the suite stays green) until their fix turns them into unexpected passes (then drop them from OPEN); the
fixed ones stay as regression tests.

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
from tests.unit.simulation.world import Faults, run_seed

# The findings still open on shared/ (none now), for the xfail reason (docs/simulation.md has the code paths). A finding
# not listed here is fixed: its scenario and seeds are plain regression tests.
OPEN: dict[str, str] = {}

# Paths of an open finding that are fixed already: (finding, seed; None: its scenario).
FIXED_PATHS: set[tuple[str, int | None]] = set()


def _marks(finding: str, seed: int | None = None) -> list[pytest.MarkDecorator]:
    if finding not in OPEN or (finding, seed) in FIXED_PATHS:
        return []
    return [pytest.mark.xfail(strict=True, reason=f"finding {finding} not fixed yet: {OPEN[finding]}")]


@pytest.mark.parametrize("finding", [pytest.param(f, marks=_marks(f)) for f in sorted(FINDINGS)])
def test_finding_scenario_keeps_every_invariant(finding: str) -> None:
    results = [run_scenario(finding, seed) for seed in range(SEEDS_PER_SCENARIO)]
    failing = [r for r in results if r.violations or r.aborted]
    assert not failing, (
        f"{finding}: {len(failing)} of {SEEDS_PER_SCENARIO} interleavings break an invariant "
        f"(python -m tests.unit.simulation --scenario {finding} --seed {failing[0].seed}):\n{failing[0].report()}"
    )


# (finding, seed, the faults widened to reach it) -- found by the random exploration, on 729675b's shared/ (F9 452:
# on 2dac825's). The switches of fixed findings are back in CI_FAULTS; their entries stay as regressions.
SEEDS = [
    ("D3", 952, {"reenable": True}),  # a retry skipped at its start (disabled); re-enabled; next request dropped
    ("D3", 52, {"reenable": True}),  # the same, and the claim left retry_pending: the next request is dropped
    ("D5", 82, {"failure_metadata": 0.3}),
    ("F6", 46, {"lock_lost": 0.01, "duplicate": 0.05}),  # a scheduled copy takes over a live redelivery's claim
    ("F6", 828, {"lock_lost": 0.01, "duplicate": 0.05}),  # two calls in flight
    ("F7", 1173, {"paced_without_scheduler": True}),
    ("F8", 615, {"faults_after_outcome": True}),
    ("F9", 452, {"no_retry_scheduler": 0.3}),
    # Found on 872dda2 with every fault:
    ("D3", 20, vars(Faults())),
    ("F9", 244, vars(Faults())),
    ("F10", 892, vars(Faults()) | {"no_retry_scheduler": 0.0, "reenable": False}),
    ("F10", 935, vars(Faults()) | {"no_retry_scheduler": 0.0, "reenable": False}),
]


# The faults the exploration ran with when these seeds were found (a replay needs the same ones).
FOUND_WITH = Faults(
    failure_metadata=0.0,
    lock_lost=0.0,
    duplicate=0.0,
    faults_after_outcome=False,
    paced_without_scheduler=False,
    reenable=False,
)
SEED_PARAMS = [pytest.param(*e, marks=_marks(e[0], e[1]), id=f"{e[0]}-seed{e[1]}") for e in SEEDS]


@pytest.mark.parametrize(("finding", "seed", "widened"), SEED_PARAMS)
def test_finding_seed_keeps_every_invariant(finding: str, seed: int, widened: dict[str, object]) -> None:
    result = run_seed(seed, replace(FOUND_WITH, **widened))  # type: ignore[arg-type]
    assert not (result.violations or result.aborted), f"{finding}:\n{result.report()}"
