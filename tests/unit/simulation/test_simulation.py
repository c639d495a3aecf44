"""The deterministic simulation's random exploration (docs/simulation.md): seeded schedules of the real refresh
protocol and check on in-memory stand-ins, with the invariants checked after every step.

The exploration runs with CI_FAULTS (tests/unit/simulation/world.py): every fault, except the paths of the findings
not fixed yet, which tests/unit/simulation/test_found_defects.py keeps as failing scenarios.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.unit.simulation.world import CI_FAULTS, TOTALS, Faults, run_seed

# Seeds per CI run: 20-45 s on this shared 2-core machine (docs/simulation.md). More: `python -m tests.unit.simulation`.
SEEDS = int(os.environ.get("SIM_SEEDS", "1000"))
FIRST_SEED = int(os.environ.get("SIM_FIRST_SEED", "0"))

# Seeds that once caught a fault of the simulation itself (a replay must keep passing): 50 ran a redelivery with the
# DeliveryCount of the message after its lock was lost; 48 let a 504 run on longer than the in-flight window the app
# assumes; 200 asked for an outcome after a repeated request id that its earlier outcome answers.
REGRESSIONS = [50, 48, 200]

# Seeds that caught a defect of the app once the open findings were fixed (issue #22), each a regression test:
# 210 reused a scheduled copy's number that a Cosmos outage had used unrecorded (its MessageId was dropped as a
# duplicate); 971 left a claim in progress when the connection was disabled while its holder was over; 2263 never
# published an outcome recorded just before a crash; 2937 completed a message whose earlier, lock-lost delivery held
# the claim and then raised.
APP_REGRESSIONS = [210, 971, 2263, 2937]


def _explain(seed: int, faults: Faults) -> str:
    result = run_seed(seed, faults)
    return result.report() if result.violations or result.aborted else ""


# In chunks: each its own test, within pytest's timeout on a machine that runs other tests' services meanwhile.
CHUNKS = 4


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_seeded_schedules_keep_every_invariant(chunk: int) -> None:
    started = time.monotonic()
    seeds = range(FIRST_SEED + chunk, FIRST_SEED + SEEDS, CHUNKS)
    failing = []
    for seed in seeds:
        result = run_seed(seed, CI_FAULTS)
        if result.violations or result.aborted:
            failing.append(seed)
    TOTALS.seconds += time.monotonic() - started
    assert not failing, (
        f"{len(failing)} of {len(seeds)} schedules broke an invariant (seeds {failing[:10]}); the first, replayed "
        f"(python -m tests.unit.simulation --replay {failing[0]}):\n{_explain(failing[0], CI_FAULTS)}"
    )


@pytest.mark.parametrize("seed", REGRESSIONS + APP_REGRESSIONS)
def test_regression_seed(seed: int) -> None:
    report = _explain(seed, CI_FAULTS)
    assert not report, report


def test_the_same_seed_gives_the_same_trace() -> None:
    first, second = run_seed(7, CI_FAULTS), run_seed(7, CI_FAULTS)
    assert first.trace == second.trace
    assert first.steps > 20  # the schedule did something: a check, deliveries, calls
