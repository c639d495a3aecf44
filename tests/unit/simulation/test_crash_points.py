"""The crash points of docs/failure-points.md in the simulation (tests/unit/simulation/crash_points.py): each over
a few interleavings, with the simulation's invariants after every step (never two calls at once, at most one refresh
per token, an outcome for every request...) and the outcome the table promises. The e2e layer runs the crash points
that need real processes (tests/e2e/test_crash_points.py); every crash point runs in one of the two."""

from __future__ import annotations

import pytest

from shared.events import REFRESHED
from tests.support.crash_points import SCENARIOS
from tests.unit.simulation.crash_points import SIMULATED
from tests.unit.simulation.scenarios import SEEDS_PER_SCENARIO
from tests.unit.simulation.world import START, World, counted

OUTCOMES = {point.id: point.outcome for point in SCENARIOS}


def test_every_crash_point_runs_in_the_simulation_or_end_to_end():
    assert set(SIMULATED) <= set(OUTCOMES), "a simulated crash point that the table does not have"
    assert [p.id for p in SCENARIOS if not p.e2e and p.id not in SIMULATED] == []


@pytest.mark.parametrize("point", sorted(SIMULATED))
def test_the_guarantees_hold_at_the_crash_point(point: str) -> None:
    for seed in range(SEEDS_PER_SCENARIO):
        world = World(seed, SIMULATED[point]())
        result = counted(world.run())
        assert not (result.violations or result.aborted), f"{point}, seed {seed}:\n{result.report()}"
        assert world.scenario.at_label == [], f"{point}, seed {seed}: the scripted fault never fired"
        for prefix in world.scenario.always_fault:
            assert any(prefix in line and "-> FAULT" in line for line in result.trace), (
                f"{point}: {prefix} never failed"
            )
        # The request of the first check ends with the outcome the table promises (repeats: the same event).
        first_check_outcomes = {
            event.type for at, event in world.outcomes if at < START + world.settings.interval_ms / 1000
        }
        assert first_check_outcomes == {OUTCOMES[point]}, f"{point}, seed {seed}:\n{result.report()}"
        if OUTCOMES[point] == REFRESHED:
            assert [c for c in world.manager.calls if c.refreshed], f"{point}, seed {seed}: nothing refreshed"
