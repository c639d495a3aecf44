"""The classification table of docs/failure-handling.md is complete (each row is checked against a real
HTTP server in tests/integration/test_failure_classes.py)."""

from shared.failure_classes import FailureKind
from tests.support.failure_table import ROWS


def test_the_table_has_rows_of_every_kind():
    assert {row.kind for row in ROWS} == set(FailureKind)
    assert len(ROWS) >= 20
