"""The CLI's commands (`check --dry-run`, `trigger`) in-process through `localdev.cli.main`, against the
real local services. Its settings loading, usage errors and logging, without services:
tests/unit/test_cli.py."""

import logging
import time
from datetime import timedelta

import pytest

from localdev.cli import main
from shared.times import parse_time, utc_now
from tests.support.documents import seed_expiring, seed_without_expiry, upsert_connection


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
    # The runbook's: equal to the 1-hour interval, so within the interval + 5 min (below the interval is refused).
    monkeypatch.setenv("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "3600000")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    warnings = [r for r in caplog.records if "is shorter than TOKEN_REFRESH_INTERVAL_MS" in r.getMessage()]
    assert len(warnings) == 1


def test_check_shows_the_schedule_a_check_would_make_and_saves_nothing(
    operator_env, cosmos_container, state_container_name, cosmos_database, monkeypatch, capsys
):
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", "salesforce=2/s")
    for n in range(6):  # 3 s of requests at 2/s, the tokens expiring within ~1 s: some late
        seed_expiring(cosmos_container, f"sf-{n}", utc_now() + timedelta(milliseconds=900 + 10 * n))
    seed_expiring(cosmos_container, "hs-1", utc_now() + timedelta(minutes=20), "hubspot")
    assert main(["check", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("sf-", "hs-"))}
    assert rows["hs-1"][-2:] == ["at", "once"]  # not limited
    times = [parse_time(rows[f"sf-{n}"][-1]) for n in range(6)]
    assert [round((t - times[0]).total_seconds(), 1) for t in times] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    [schedule] = [line.split() for line in out.splitlines() if line.strip().startswith("salesforce ")]
    assert schedule[1:3] == ["2/s", "6"] and int(schedule[-1]) >= 3  # limit, count, late
    assert "hubspot " not in out.split("Schedule")[1]  # not limited: not in the schedule
    # A dry run: no pacing document was written, so a real check starts from now.
    states = cosmos_database.get_container_client(state_container_name)
    assert not list(states.query_items("SELECT * FROM c WHERE c.kind = 'pacing'", enable_cross_partition_query=True))
