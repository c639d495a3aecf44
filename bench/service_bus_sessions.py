"""What Service Bus sessions would cost the refresh function per Functions instance: a simulation, not a run.

One instance empties the refresh queue of 2,000 refresh requests through the Functions Service Bus trigger's
processor as localdev/service_bus_model.py models it, with this repo's host.json (ProcessorOptions.from_host_json)
and the refresh queue's properties from localdev/service_bus_queues.json; with sessions, the same queue with
requiresSession on and one session per connection (every request its own session id, or 10 % of the sessions
holding two requests). A handler takes the integration-manager call (20 ms or 200 ms) plus the app's own cost per
refresh (`app_cost_ms`, ~17 ms of CPU measured by bench/worker_cost.py and the refresh bench).

Every figure printed is computed by the simulation in this run. The main table adds the app's cost to each
handler's time, as if it overlapped freely; the last table makes it CPU time that one Python worker process
(its GIL) runs one handler at a time, which caps throughput at 1000 / app_cost_ms per worker process.

    python bench/service_bus_sessions.py [--app-cost-ms 17] [--messages 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parent.parent
if str(APP_ROOT) not in sys.path:
    sys.path.insert(0, str(APP_ROOT))

from localdev.service_bus_model import (
    ModelMessage,
    ProcessorOptions,
    ProcessorRun,
    QueueProperties,
    ServiceBusModel,
    VirtualClock,
    queue_properties,
    simulate_processor,
)

REFRESH_QUEUE = "integration.token.refresh-requested"
HOST_JSON = APP_ROOT / "host.json"
MESSAGES = 2000
APP_COST_MS = 17.0
MANAGER_MS = (20, 200)  # the integration-manager call
SESSION_IDLE_TIMEOUTS_S = (0.1, 1.0)
MAX_CONCURRENT_SESSIONS = (16, 64)
# What host.json said before the refresh queue dropped sessions (#20), compared in the report.
PREVIOUS_SESSIONS, PREVIOUS_IDLE_S = 16, 1.0
TWO_MESSAGE_SHARE = 0.1  # of the sessions, in the second layout
ONE_PER_SESSION = "1 per session"
SOME_TWO_PER_SESSION = "1; 10% of them 2"


def session_layout(messages: int, two_message_share: float) -> list[int]:
    """Messages per session, `messages` in all: every (1 / share)-th session holds two (a connection asked twice)."""
    every = round(1 / two_message_share) if two_message_share else 0
    layout: list[int] = []
    while sum(layout) < messages:
        wanted = 2 if every and len(layout) % every == 0 else 1
        layout.append(min(wanted, messages - sum(layout)))
    return layout


def simulate(
    properties: QueueProperties,
    options: ProcessorOptions,
    layout: list[int],
    handler_s: float,
    cpu_s: float | None = None,
) -> ProcessorRun:
    """One instance emptying a queue filled with `layout` (messages per session) at the start."""
    clock = VirtualClock()
    model = ServiceBusModel([properties], clock.now)
    for session, count in enumerate(layout):
        for index in range(count):
            session_id = f"connection-{session}" if properties.requires_session else None
            accepted = model.send(properties.name, ModelMessage(b"{}", f"refresh-{session}-{index}", session_id))
            assert accepted, "every request has its own MessageId: duplicate detection must not drop one"
    run = simulate_processor(
        model,
        properties.name,
        options,
        lambda _: handler_s,
        clock,
        properties.requires_session,
        cpu_seconds=None if cpu_s is None else (lambda _: cpu_s),
    )
    assert run.messages_handled == sum(layout) == len(run.deliveries_per_message), "every request handled once"
    assert run.lost_lock_completions == 0
    return run


def _row(run: ProcessorRun, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "messages": run.messages_handled,
        "elapsed_s": round(run.elapsed_seconds, 3),
        "throughput_per_s": round(run.throughput, 2),
        "max_concurrent_handlers": run.max_concurrent_handlers,
        "max_deliveries_per_message": max(run.deliveries_per_message.values()),
    }


def measure(app_cost_ms: float = APP_COST_MS, messages: int = MESSAGES, host_json: Path = HOST_JSON) -> dict[str, Any]:
    """The figures: one row per simulated configuration, and each sessions row's throughput over the
    no-sessions row's at the same handler time ("vs_no_sessions")."""
    host = ProcessorOptions.from_host_json(host_json)
    host_idle = host.effective_session_idle_timeout
    plain = replace(queue_properties()[REFRESH_QUEUE], requires_session=False)
    with_sessions = replace(plain, requires_session=True)
    layouts = {
        ONE_PER_SESSION: session_layout(messages, 0.0),
        SOME_TWO_PER_SESSION: session_layout(messages, TWO_MESSAGE_SHARE),
    }
    # host.json's session settings, then each of the compared idle timeouts with each session count
    session_settings = list(
        dict.fromkeys(
            [
                (host_idle, host.max_concurrent_sessions),
                *(
                    (timedelta(seconds=idle), count)
                    for idle in SESSION_IDLE_TIMEOUTS_S
                    for count in MAX_CONCURRENT_SESSIONS
                ),
            ]
        )
    )
    rows: list[dict[str, Any]] = []
    gil_rows: list[dict[str, Any]] = []
    for manager_ms in MANAGER_MS:
        handler_s = (manager_ms + app_cost_ms) / 1000
        baseline = simulate(plain, host, layouts[ONE_PER_SESSION], handler_s)
        common = {"manager_ms": manager_ms, "handler_ms": round(handler_s * 1000, 3)}
        rows.append(
            _row(baseline, **common, sessions=False, layout="-", concurrency=host.max_concurrent_calls)
            | {"session_idle_timeout_s": None, "host_json": True, "vs_no_sessions": 1.0}
        )
        for layout_name, layout in layouts.items():
            for idle, count in session_settings:
                options = replace(host, session_idle_timeout=idle, max_concurrent_sessions=count)
                run = simulate(with_sessions, options, layout, handler_s)
                rows.append(
                    _row(run, **common, sessions=True, layout=layout_name, concurrency=count)
                    | {
                        "session_idle_timeout_s": idle.total_seconds(),
                        "host_json": idle == host_idle and count == host.max_concurrent_sessions,
                        "vs_no_sessions": round(run.throughput / baseline.throughput, 6),
                    }
                )
        # The app's cost as CPU on one worker process: handlers' CPU parts take turns (the GIL).
        cpu_s, io_s = app_cost_ms / 1000, manager_ms / 1000
        gil_baseline = simulate(plain, host, layouts[ONE_PER_SESSION], io_s, cpu_s)
        gil_rows.append(
            _row(gil_baseline, **common, sessions=False, layout="-", concurrency=host.max_concurrent_calls)
            | {"session_idle_timeout_s": None, "host_json": True, "vs_no_sessions": 1.0}
        )
        for idle, count in session_settings:
            options = replace(host, session_idle_timeout=idle, max_concurrent_sessions=count)
            run = simulate(with_sessions, options, layouts[ONE_PER_SESSION], io_s, cpu_s)
            gil_rows.append(
                _row(run, **common, sessions=True, layout=ONE_PER_SESSION, concurrency=count)
                | {
                    "session_idle_timeout_s": idle.total_seconds(),
                    "host_json": idle == host_idle and count == host.max_concurrent_sessions,
                    "vs_no_sessions": round(run.throughput / gil_baseline.throughput, 6),
                }
            )
    return {
        "messages": messages,
        "app_cost_ms": app_cost_ms,
        "host_json": {
            "maxConcurrentCalls": host.max_concurrent_calls,
            "maxConcurrentSessions": host.max_concurrent_sessions,
            "sessionIdleTimeout_s": None if host.session_idle_timeout is None else host_idle.total_seconds(),
            "tryTimeout_s": host.try_timeout.total_seconds(),
            "maxAutoLockRenewalDuration_s": host.max_auto_lock_renewal_duration.total_seconds(),
        },
        "refresh_queue": {
            "lockDuration_s": plain.lock_duration.total_seconds(),
            "maxDeliveryCount": plain.max_delivery_count,
            "duplicateDetectionHistoryTimeWindow_s": (
                None if plain.duplicate_detection_window is None else plain.duplicate_detection_window.total_seconds()
            ),
        },
        "rows": rows,
        "app_cost_as_cpu_rows": gil_rows,
    }


def _table(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        f"{'manager':>7} {'handler':>8} {'mode':<12} {'messages/session':<19} {'conc.':>5} {'idle':>6} "
        f"{'msgs/s':>8} {'elapsed':>9} {'max run':>7} {'vs none':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        idle = "-" if row["session_idle_timeout_s"] is None else f"{row['session_idle_timeout_s']:g} s"
        mode = "sessions" if row["sessions"] else "no sessions"
        marker = " <- host.json" if row.get("host_json") and row["sessions"] else ""
        lines.append(
            f"{row['manager_ms']:>5}ms {row['handler_ms']:>6g}ms {mode:<12} {row['layout']:<19} "
            f"{row['concurrency']:>5} {idle:>6} {row['throughput_per_s']:>8.2f} {row['elapsed_s']:>8.2f}s "
            f"{row['max_concurrent_handlers']:>7} {_percent(row['vs_no_sessions']):>8}{marker}"
        )
    return lines


def report(figures: dict[str, Any]) -> str:
    """The figures as a readable text: the settings, the main table, the ratios, the GIL table."""
    host, queue = figures["host_json"], figures["refresh_queue"]
    idle = host["sessionIdleTimeout_s"]
    idle_text = f"unset (tryTimeout {host['tryTimeout_s']:g} s)" if idle is None else f"{idle:g} s"
    lines = [
        f"Service Bus sessions, simulated: one Functions instance empties {figures['messages']} refresh requests",
        f"host.json: maxConcurrentCalls {host['maxConcurrentCalls']}, maxConcurrentSessions "
        f"{host['maxConcurrentSessions']}, sessionIdleTimeout "
        f"{idle_text}, maxAutoLockRenewalDuration {host['maxAutoLockRenewalDuration_s']:g} s",
        f"refresh queue: lockDuration {queue['lockDuration_s']:g} s, maxDeliveryCount {queue['maxDeliveryCount']}, "
        f"duplicate detection window {queue['duplicateDetectionHistoryTimeWindow_s']:g} s; "
        "the sessions rows turn requiresSession on",
        f"handler = integration-manager call + the app's own {figures['app_cost_ms']:g} ms per refresh; "
        "conc. = maxConcurrentCalls (no sessions) or maxConcurrentSessions; idle = sessionIdleTimeout; "
        "max run = most handlers running at once; vs none = throughput / no sessions at the same handler time",
        "",
        *_table(figures["rows"]),
        "",
    ]
    compared = {
        "host.json's session settings (defaults where unset)": lambda row: row["host_json"],
        "sessions as deployed before #20 (16 sessions, sessionIdleTimeout 1 s)": lambda row: (
            row["concurrency"] == PREVIOUS_SESSIONS and row["session_idle_timeout_s"] == PREVIOUS_IDLE_S
        ),
    }
    for title, chosen in compared.items():
        lines.append(f"Ratios with / without sessions, {title}:")
        for row in figures["rows"]:
            if row["sessions"] and chosen(row):
                lines.append(
                    f"  manager {row['manager_ms']} ms, {row['layout']}: {_percent(row['vs_no_sessions'])} "
                    f"({row['throughput_per_s']:.2f} vs "
                    f"{_baseline(figures['rows'], row['manager_ms'])['throughput_per_s']:.2f} msgs/s)"
                )
    lines += [
        "",
        f"The app's {figures['app_cost_ms']:g} ms as CPU time of one Python worker process (GIL: one handler's CPU "
        "part at a time), the manager call as waiting:",
        *_table(figures["app_cost_as_cpu_rows"]),
    ]
    return "\n".join(lines)


def _percent(ratio: float) -> str:
    return f"{ratio:.1%}" if ratio >= 0.01 else f"{ratio:.3%}"


def _baseline(rows: list[dict[str, Any]], manager_ms: int) -> dict[str, Any]:
    return next(row for row in rows if row["manager_ms"] == manager_ms and not row["sessions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-cost-ms", type=float, default=APP_COST_MS)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    arguments = parser.parse_args()
    figures = measure(app_cost_ms=arguments.app_cost_ms, messages=arguments.messages)
    print(json.dumps(figures, indent=2) if arguments.json else report(figures))


if __name__ == "__main__":
    main()
