"""What the Functions host reads of each function: the bindings in its function.json. Each function's
main() against the real services: tests/integration/test_functions.py; loaded by the real worker:
tests/integration/test_real_worker.py."""

import json

from shared.events import CHECK_EXPIRING, REFRESH_REQUESTED
from tests.support.helpers import APP_ROOT


def test_function_json_bindings_match_the_queues_and_connection():
    for folder, queue in (("manager_check_handler", CHECK_EXPIRING), ("sync_refresh_handler", REFRESH_REQUESTED)):
        with open(APP_ROOT / folder / "function.json") as handle:
            [binding] = json.load(handle)["bindings"]
        assert binding == {
            "name": "message",
            "type": "serviceBusTrigger",
            "direction": "in",
            "queueName": queue,
            "connection": "ServiceBusConnection",
        }  # no isSessionsEnabled: the refresh queue has no sessions (localdev/service_bus_queues.json)
    with open(APP_ROOT / "check_expiring_timer" / "function.json") as handle:
        [binding] = json.load(handle)["bindings"]
    assert binding["type"] == "timerTrigger" and binding["name"] == "timer"
