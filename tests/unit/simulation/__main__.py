"""Longer explorations and replays of the simulation (docs/simulation.md).

python -m tests.unit.simulation --seeds 20000 --start 100000      # explore with CI_FAULTS
python -m tests.unit.simulation --seeds 5000 --all-faults          # every fault, findings included
python -m tests.unit.simulation --replay 1173 --all-faults         # one seed's trace
python -m tests.unit.simulation --scenario D1 --seed 0             # a finding's scenario
SIM_LOG=1 python -m tests.unit.simulation --replay 46 --all-faults # with the app's log lines
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tests.unit.simulation.scenarios import FINDINGS, run_scenario
from tests.unit.simulation.world import CI_FAULTS, TOTALS, Faults, run_seed


def main(argv: list[str] | None = None) -> int:
    """Run the exploration or a replay; exit status 1 when an invariant broke."""
    parser = argparse.ArgumentParser(prog="python -m tests.unit.simulation", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to explore")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--all-faults", action="store_true", help="also the faults CI_FAULTS narrows away")
    parser.add_argument("--replay", type=int, help="print the trace of this seed")
    parser.add_argument("--scenario", choices=sorted(FINDINGS), help="run a finding's scenario (with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --scenario")
    args = parser.parse_args(argv)
    if os.environ.get("SIM_LOG"):
        logging.basicConfig(level=logging.INFO, format="%(threadName)-12s %(name)s: %(message)s")
    faults = Faults() if args.all_faults else CI_FAULTS
    if args.scenario:
        result = run_scenario(args.scenario, args.seed)
        print(result.report())
        return 1 if result.violations else 0
    if args.replay is not None:
        result = run_seed(args.replay, faults)
        print(result.report() + (f"\n  aborted: {result.aborted}" if result.aborted else ""))
        return 1 if result.violations or result.aborted else 0
    started, failing = time.monotonic(), []
    for seed in range(args.start, args.start + args.seeds):
        result = run_seed(seed, faults)
        if result.violations or result.aborted:
            failing.append(seed)
            print(f"seed {seed}: {(result.violations or [result.aborted])[0]}")
    elapsed = time.monotonic() - started
    print(
        f"{TOTALS.schedules} schedules, {TOTALS.steps} steps, {TOTALS.calls} manager calls in {elapsed:.1f} s; "
        f"{len(failing)} broke an invariant" + (f" (replay: --replay {failing[0]})" if failing else "")
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
