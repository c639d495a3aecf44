"""docs/failure-points.md is the crash-point scenario table (`python -m tests.support.crash_points`
prints it); the scenarios themselves run in tests/e2e/test_crash_points.py."""

from tests.support.crash_points import DOCS_TABLE, docs_table


def test_the_docs_table_is_the_scenario_table():
    text = DOCS_TABLE.read_text(encoding="utf-8")
    assert docs_table() in text, (
        f"{DOCS_TABLE} is out of date: run `python -m tests.support.crash_points` and paste its table"
    )
