"""Command line for running the app locally: `python -m shared.cli --help`.

Reads `local.settings.json` `Values` (from the current folder, else the app root) into the
environment first, as `func start` does; variables already in the environment win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

from shared.runtime import QUIET_LOGGERS
from shared.settings import Settings, SettingsError, load_settings, warn_about_risky_threshold

APP_ROOT = Path(__file__).resolve().parent.parent


def load_local_settings(environ: dict[str, str] | None = None, search: tuple[Path, ...] | None = None) -> Path | None:
    """Merge local.settings.json Values into `environ` without overriding it. Returns the file used."""
    environ = os.environ if environ is None else environ
    for folder in search or (Path.cwd(), APP_ROOT):
        path = folder / "local.settings.json"
        if path.is_file():
            try:
                values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
            except (ValueError, AttributeError) as error:
                raise SettingsError(f"{path} is not valid JSON with a Values object ({error})") from None
            for name, value in values.items():
                environ.setdefault(name, str(value))
            return path
    return None


def _command_check(settings: Settings, args: argparse.Namespace) -> int:
    from shared import runtime
    from shared.events import format_time, utc_now
    from shared.expiring_check import find_expiring_connections

    threshold = utc_now() + timedelta(milliseconds=settings.expiration_threshold_ms)
    print(f"Connections whose token expires by {format_time(threshold)} (dry run: nothing is published):")
    print(f"{'connectionId':<36} {'integrationId':<20} {'tenantId':<20} {'status':<10} expiresAt")
    count = 0
    for connection in find_expiring_connections(runtime.connection_store(), runtime.state_store(), threshold, settings):
        count += 1
        print(
            f"{connection.connection_id!s:<36} {connection.integration_id!s:<20} {connection.tenant_id!s:<20} "
            f"{connection.status or '-':<10} {format_time(connection.expires_at)}"
        )
    print(f"{count} connection(s) would be refreshed.")
    return 0


def _command_run(settings: Settings, args: argparse.Namespace) -> int:
    from shared import runtime
    from shared.local_host import LocalHost

    host = LocalHost(settings, queue_prefix=args.queue_prefix, workers=args.workers)
    if args.once:
        try:
            summary = host.run_once()
        finally:
            host.close()
            runtime.reset()
        print(
            f"Cycle finished: found {summary.found}, refreshed {summary.refreshed}, failed {summary.failed}, "
            f"dead-lettered {summary.dead_lettered}"
        )
        for failure in summary.failures:
            error = failure.get("error", {})
            print(
                f"  failed: connection {failure.get('connectionId')!r} ({failure.get('integrationId')}): "
                f"{error.get('code')} - {error.get('message')} (retryable={failure.get('retryable')})"
            )
        return 0

    signal.signal(signal.SIGTERM, lambda *_: host.stop())
    try:
        host.run_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        runtime.reset()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.cli", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the three functions locally with RabbitMQ as the transport")
    run.add_argument("--once", action="store_true", help="one full cycle, print a summary, exit")
    run.add_argument(
        "--max-deliveries",
        type=_positive_int,
        help="deliveries per message before it is dead-lettered (sets TOKEN_REFRESH_MAX_DELIVERY_COUNT, default 10)",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=4,
        help="refresh requests handled at once, each worker on its own connection (default 4)",
    )
    run.add_argument(
        "--queue-prefix",
        default="integration-token-refresh.",
        help="prefix of the local host's RabbitMQ queues (default integration-token-refresh.)",
    )
    run.set_defaults(handler=_command_run)

    check = commands.add_parser("check", help="list the connections that are due for refresh now")
    check.add_argument("--dry-run", action="store_true", required=True, help="publish nothing (required)")
    check.set_defaults(handler=_command_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "max_deliveries", None):
        os.environ["TOKEN_REFRESH_MAX_DELIVERY_COUNT"] = str(args.max_deliveries)
    try:
        load_local_settings()
        settings = load_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    warn_about_risky_threshold(settings)
    try:
        return args.handler(settings, args)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
