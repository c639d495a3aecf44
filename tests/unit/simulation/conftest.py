"""Reports what the simulation explored in pytest's terminal summary (whatever -s/-q say): schedules, steps,
manager calls and outcome events of this run."""

from __future__ import annotations

from typing import Any

from tests.unit.simulation.world import TOTALS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line after the run, when any simulation test ran."""
    if TOTALS.schedules:
        terminalreporter.write_line(
            f"simulation: {TOTALS.schedules} schedules, {TOTALS.steps} steps, {TOTALS.calls} manager calls, "
            f"{TOTALS.outcomes} outcome events (random exploration: {TOTALS.seconds:.1f} s)"
        )
