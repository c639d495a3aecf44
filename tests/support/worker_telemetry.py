"""Application Insights through the real worker, for tests/integration/test_real_worker.py.

`python -m tests.support.worker_telemetry PLAN_FILE` (app settings in the environment): in a process of its
own, because the Azure Monitor distro configures process-wide state once, it starts a local Application
Insights ingestion endpoint, lets the worker configure Azure Monitor OpenTelemetry as the deployment does
(PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true), loads the app, runs the invocations of PLAN_FILE in order
(a JSON list of {"function": name, "traceparent": the host's trace context, "body": the Service Bus message's
body, for a Service Bus trigger}; a timer ticks past due), and prints each invocation's id and outcome and every
telemetry envelope the real exporter sent, as one JSON object.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.functions_worker import FunctionFolder, FunctionsWorker, ServiceBusDelivery

APP_ROOT = Path(__file__).resolve().parents[2]
FLUSH_TIMEOUT_S = 30


class IngestionEndpoint(BaseHTTPRequestHandler):
    """Application Insights' ingestion API (`/v2.1/track`), keeping every envelope it receives."""

    protocol_version = "HTTP/1.0"  # one request per connection: the exporter's keep-alive reads can stall
    envelopes: list[dict[str, Any]] = []  # noqa: RUF012 - one endpoint per process

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        if self.path.startswith("/v2.1/track"):
            received = json.loads(body) if body.lstrip().startswith(b"[") else [json.loads(body)]
            self.envelopes.extend(received)
            answer = {"itemsReceived": len(received), "itemsAccepted": len(received), "errors": []}
            self._reply(json.dumps(answer).encode())
        else:  # live metrics pings: not subscribed
            self._reply(b"{}", {"x-ms-qps-subscribed": "false"})

    def _reply(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def hermetic_telemetry_settings(endpoint: str, scratch: str) -> dict[str, str]:
    """The worker's telemetry app settings, pointed at `endpoint`, with everything that would call
    other Azure endpoints (live metrics, control plane, statsbeat, metrics, IMDS) kept local or off."""
    return {
        "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "true",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": (
            f"InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint={endpoint};"
            f"LiveEndpoint={endpoint}"
        ),
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "azure_functions",
        "OTEL_SERVICE_NAME": "token-refresh-test",
        "TMPDIR": scratch,  # the exporter's offline storage folder
    }


def invoke(worker: FunctionsWorker, step: dict[str, Any]) -> dict[str, Any]:
    """One invocation of the plan, as the host would make it; its id and outcome."""
    from shared.events import parse_event

    function, trace_parent = step["function"], step["traceparent"]
    queue = FunctionFolder.read(APP_ROOT / function).queue_name
    if queue is None:
        result = worker.invoke_timer(function, past_due=True, trace_parent=trace_parent)
    else:  # the Service Bus queue is named after the event type it carries
        event, _ = parse_event(step["body"].encode(), queue)
        result = worker.invoke_service_bus(function, ServiceBusDelivery.of_event(event), trace_parent=trace_parent)
    return {
        "function": function,
        "invocation_id": result.invocation_id,
        "succeeded": result.succeeded,
        "error": result.error,
    }


def main(argv: list[str]) -> int:
    [plan_file] = argv
    server = ThreadingHTTPServer(("127.0.0.1", 0), IngestionEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scratch = tempfile.mkdtemp(prefix="worker-telemetry-")
    os.environ.update(hermetic_telemetry_settings(f"http://127.0.0.1:{server.server_port}/", scratch))
    tempfile.tempdir = scratch
    logging.getLogger().setLevel(logging.INFO)  # as the proxy worker sets it

    worker = FunctionsWorker(APP_ROOT).start()
    errors = worker.load_all()
    invocations = [invoke(worker, step) for step in json.loads(Path(plan_file).read_text(encoding="utf-8"))]

    from opentelemetry._logs import get_logger_provider

    watchdog = threading.Timer(FLUSH_TIMEOUT_S, lambda: os._exit(3))  # force_flush() has no timeout
    watchdog.start()
    get_logger_provider().force_flush()
    watchdog.cancel()
    print(
        json.dumps(
            {
                "load_errors": errors,
                "invocations": invocations,
                "envelopes": IngestionEndpoint.envelopes,
            }
        ),
        flush=True,
    )
    os._exit(0)  # skip the distro's exit-time export: everything was flushed above


if __name__ == "__main__":
    main(sys.argv[1:])
