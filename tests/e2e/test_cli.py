"""The CLI's commands (`check --dry-run`, `trigger`) in-process through `localdev.cli.main`, against the
real local services. Its settings loading, usage errors and logging, without services:
tests/unit/test_cli.py."""

import logging
import time

import pytest

from localdev.cli import main
from tests.support.documents import seed_without_expiry, upsert_connection


def test_check_lists_a_token_without_expiry_selected_by_max_age(operator_env, cosmos_container, monkeypatch, capsys):
    monkeypatch.setenv("TOKEN_REFRESH_MAX_AGE_MS", "1000")
    upsert_connection(cosmos_container, "conn-due", expires_in_h=0.5)
    seed_without_expiry(cosmos_container, "conn-no-expiry")
    time.sleep(2.1)  # older than the max age (Cosmos _ts has whole seconds)
    assert main(["check", "--dry-run"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("conn-no-expiry")]
    assert row.split()[-2:] == ["no", "expiry"]
    assert "2 connection(s) would be refreshed." in out


@pytest.mark.parametrize("argv", [["check", "--dry-run"], ["trigger"]])
def test_the_risky_threshold_warning_is_logged_once_per_command(operator_env, event_tap, monkeypatch, caplog, argv):
    monkeypatch.setenv("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "60000")  # shorter than the 1-hour interval
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    warnings = [r for r in caplog.records if "is shorter than TOKEN_REFRESH_INTERVAL_MS" in r.getMessage()]
    assert len(warnings) == 1
