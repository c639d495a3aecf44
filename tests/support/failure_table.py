"""The classification table of docs/failure-handling.md (between its classification-table markers):
each row is an answer of integration-manager and what the app makes of it."""

from dataclasses import dataclass

from shared.failure_classes import FailureKind
from tests.support.helpers import APP_ROOT

DOC = APP_ROOT / "docs" / "failure-handling.md"


@dataclass(frozen=True)
class Row:
    answer: str  # an HTTP status, or how the call failed without one
    code_in_answer: str | None
    event_code: str
    kind: FailureKind
    retryable: bool
    check: str

    def __str__(self) -> str:
        return f"{self.answer}-{self.code_in_answer or 'no-code'}"


def table_rows() -> list[Row]:
    """The rows between the classification-table markers of the doc."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- classification-table -->")[1].split("<!-- /classification-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        answer, code, event_code, kind, retryable, check = cells
        rows.append(
            Row(answer, None if code == "—" else code, event_code, FailureKind(kind), retryable == "true", check)
        )
    return rows


ROWS = table_rows()
