"""Log fields per invocation, without services: concurrent invocations keep their own fields. A whole
refresh invocation: tests/integration/test_telemetry.py; the real worker's Azure Monitor exporter:
tests/integration/test_real_worker.py."""

import logging
import threading
from types import SimpleNamespace

from shared import telemetry
from tests.support.helpers import telemetry_fields


def test_concurrent_invocations_keep_their_own_fields(caplog):
    telemetry.install()
    seen = {}
    barrier = threading.Barrier(2)

    def invocation(name):
        with telemetry.invocation(SimpleNamespace(invocation_id=name), "f"):
            telemetry.bind(connectionId=f"conn-{name}")
            barrier.wait()
            logging.getLogger("shared.test").warning("working")
            seen[name] = telemetry_fields()

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=invocation, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert seen["a"]["connectionId"] == "conn-a" and seen["b"]["connectionId"] == "conn-b"
    assert sorted((r.invocationId, r.connectionId) for r in caplog.records) == [("a", "conn-a"), ("b", "conn-b")]
