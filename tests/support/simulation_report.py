"""Reports what the deterministic simulation explored (tests/unit/simulation) in pytest's terminal summary, whatever
-s/-q say: schedules, steps, manager calls and outcome events of this run. Under pytest-xdist (`make test`) each
worker sends its figures to the controller, which adds them up and prints the one line. A plugin of tests/conftest.py:
the controller loads no conftest below tests/, since it collects nothing."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import pytest

from tests.unit.simulation.world import TOTALS

WORKER_OUTPUT_KEY = "simulation_totals"


def pytest_sessionfinish(session: pytest.Session) -> None:
    worker_output = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if worker_output is not None:
        worker_output[WORKER_OUTPUT_KEY] = asdict(TOTALS)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist it is never called
def pytest_testnodedown(node: Any, error: Any) -> None:
    figures = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY) or {}
    for field in fields(TOTALS):
        setattr(TOTALS, field.name, getattr(TOTALS, field.name) + figures.get(field.name, 0))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line after the run, when any simulation test ran."""
    if TOTALS.schedules:
        terminalreporter.write_line(
            f"simulation: {TOTALS.schedules} schedules, {TOTALS.steps} steps, {TOTALS.calls} manager calls, "
            f"{TOTALS.outcomes} outcome events (random exploration: {TOTALS.seconds:.1f} s of test time)"
        )
