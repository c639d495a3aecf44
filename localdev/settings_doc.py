"""The settings table of docs/settings.md, generated from the settings model (`shared/settings.py`).

The model holds each setting's default, limits and description; the doc holds the table rendered from
them between the markers `<!-- settings-table -->` and `<!-- /settings-table -->` (the prose around it is
written by hand). `tests/unit/test_settings_doc.py` fails when the two differ.

    python -m localdev.settings_doc           rewrite the table in docs/settings.md
    python -m localdev.settings_doc --check   exit 1 (and say so) when the table differs from the model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.settings import expected_form, setting_fields, value_note

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
BEGIN = "<!-- settings-table -->"
END = "<!-- /settings-table -->"
REGENERATE = "python -m localdev.settings_doc"


def _default_cell(setting: str, default: object) -> str:
    if default is None:
        return "—"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        return f"`{','.join(default)}`"
    if default == {}:
        return "—"
    note = value_note(setting, default) if isinstance(default, int) else None
    return f"`{default}`" + (f" ({note})" if note else "")


def _meaning_cell(setting: str, field) -> str:
    meaning = field.description or ""
    if field.annotation is int:  # the limits, as a bad value's error message states them
        meaning += f". Allowed: {expected_form(setting)}"
    return meaning.replace("|", "\\|")


def settings_table_markdown() -> str:
    """The markdown table of every setting: name, default, meaning (with the limits of numbers)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for setting, field in setting_fields().items():
        rows.append(f"| `{setting}` | {_default_cell(setting, field.default)} | {_meaning_cell(setting, field)} |")
    return "\n".join(rows) + "\n"


def render_doc(text: str) -> str:
    """`text` (docs/settings.md) with the table between the markers replaced by the generated one."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/settings.md has no {BEGIN} … {END} markers for the settings table")
    note = f"<!-- generated from shared/settings.py by `{REGENERATE}`: edit the model, not this table -->"
    return text[: start + len(BEGIN)] + "\n" + note + "\n" + settings_table_markdown() + text[end:]


def main(argv: list[str] | None = None, doc: Path = DOC) -> int:
    parser = argparse.ArgumentParser(prog="python -m localdev.settings_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the doc is out of date")
    args = parser.parse_args(argv)
    text = doc.read_text(encoding="utf-8")
    rendered = render_doc(text)
    if rendered == text:
        print(f"{doc.name}: the settings table is up to date")
        return 0
    if args.check:
        print(f"{doc.name}: the settings table differs from shared/settings.py; run: {REGENERATE}", file=sys.stderr)
        return 1
    doc.write_text(rendered, encoding="utf-8")
    print(f"{doc.name}: settings table regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
