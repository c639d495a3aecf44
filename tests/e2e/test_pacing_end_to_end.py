"""Pacing end to end on the local host: `run --once` with TOKEN_REFRESH_RATE_LIMITS set, real RabbitMQ,
the Cosmos-compatible server and the stand-in manager. The check schedules the wave, the host delivers
each request at its time, and integration-manager sees each integration's calls at its rate,
soonest-expiring first. (The schedule itself across pages and checks: tests/integration/test_pacing.py;
the host's scheduled delivery: tests/e2e/test_scheduled_delivery.py.)"""

import random
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

from localdev.local_host import LocalHost
from shared import runtime
from shared.settings import load_settings
from tests.support.documents import seed_expiring
from tests.support.helpers import most_in_any_window

LIMITS = {"salesforce": 2, "hubspot": 4}  # calls 0.5 s and 0.25 s apart: more than the delivery jitter
DELIVERY_JITTER_S = 0.2  # the host's delivery and the refresh's own work before the call (a loaded machine)


def test_a_wave_reaches_integration_manager_at_each_limit_soonest_expiring_first(
    app_env, cosmos_container, manager, monkeypatch
):
    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMITS", ",".join(f"{i}={r}/s" for i, r in LIMITS.items()))
    monkeypatch.setenv("TOKEN_REFRESH_PAGE_SIZE", "5")  # the schedule goes on across pages
    runtime.reset()
    now = datetime.now(UTC)
    expiries = {}
    plan = [(f"sf-{n}", "salesforce") for n in range(6)] + [(f"hs-{n}", "hubspot") for n in range(10)]
    random.Random(5).shuffle(plan)  # stored in no particular order
    for minute, (connection_id, integration) in enumerate(plan):
        expiries[connection_id] = now + timedelta(minutes=10 + minute)
        seed_expiring(cosmos_container, connection_id, expiries[connection_id], integration)

    host = LocalHost(load_settings(), queue_prefix=f"paced-{uuid.uuid4().hex[:8]}.", workers=4)
    try:
        summary = host.run_once()
    finally:
        host.close()
        runtime.reset()

    assert (summary.found, summary.refreshed, summary.failed) == (16, 16, 0)
    assert Counter(call.connection_id for call in manager.calls) == Counter(c for c, _ in plan)  # once each
    calls = defaultdict(list)
    for call in sorted(manager.calls, key=lambda call: call.received_at):
        calls[call.integration_id].append(call)
    for integration, rate in LIMITS.items():
        called = calls[integration]
        order = [expiries[call.connection_id] for call in called]
        assert order == sorted(order), integration  # soonest-expiring first
        times = [call.received_at for call in called]
        # Each request reaches the manager after its time by the host's delivery and the refresh's own work
        # before the call (re-read, claim): a few tens of ms that vary, so one second can see one call more.
        assert times[-1] - times[0] >= (len(times) - 1) / rate - DELIVERY_JITTER_S, integration
        assert most_in_any_window(times, 1.0) <= rate + 1, (integration, times)
