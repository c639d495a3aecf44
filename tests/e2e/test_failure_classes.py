"""A problem of ours (a stale INTEGRATION_MANAGER_TOKEN) through the local host (`run --once`): one
alarm, nothing held against the connections, and recovery by itself once fixed. The classification
itself: tests/integration/test_failure_classes.py."""

import re
from datetime import UTC, datetime, timedelta

from localdev.stand_in_manager import Answer
from shared.events import REFRESH_FAILED, REFRESHED, SYSTEMIC_FAILURE
from tests.support.documents import seed_expiring
from tests.support.event_taps import of_type
from tests.support.helpers import MANAGER_TOKEN, cli_environment, run_cli


def test_a_stale_manager_token_recovers_by_itself_on_the_next_check(app_env, cosmos_container, manager, event_tap):
    """End to end through the local host (`run --once`): 50 due connections, a stale
    INTEGRATION_MANAGER_TOKEN, then the token fixed."""
    now = datetime.now(UTC)
    for n in range(50):
        seed_expiring(cosmos_container, f"conn-{n:02d}", now + timedelta(minutes=5 + n))
    manager.container = cosmos_container
    manager.token_lifetime = timedelta(hours=2)
    good = f"Bearer {MANAGER_TOKEN}"
    manager.script = lambda call: (
        Answer(200) if call.headers.get("Authorization") == good else Answer(401, {"message": "invalid token"})
    )

    stale = run_cli(cli_environment(app_env | {"INTEGRATION_MANAGER_TOKEN": "stale-token-0123"}), "run", "--once")
    assert stale.returncode == 0, stale.stderr[-3000:]
    published = event_tap.drain()
    failed = of_type(published, REFRESH_FAILED)
    assert len(failed) == 50
    assert {(f["data"]["error"]["code"], f["data"]["retryable"], f["data"]["attempts"]) for f in failed} == {
        ("unauthorized", True, 1)  # not retried: it would fail the same way
    }
    assert len(of_type(published, SYSTEMIC_FAILURE)) == 1
    assert len(re.findall(r" ERROR .*Systemic refresh failure", stale.stderr)) == 1, stale.stderr[-3000:]
    assert "Check INTEGRATION_MANAGER_TOKEN" in stale.stderr and "stale-token-0123" not in stale.stderr
    assert len(re.findall(r" WARNING .*OAuth token refresh failed", stale.stderr)) < 10  # not 50 shouting lines

    fixed = run_cli(cli_environment(app_env), "run", "--once")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "found=50 " in fixed.stderr and "suppressed=0 " in fixed.stderr, fixed.stderr[-3000:]
    published = event_tap.drain()
    assert len(of_type(published, REFRESHED)) == 50
    assert of_type(published, REFRESH_FAILED) == [] and of_type(published, SYSTEMIC_FAILURE) == []
