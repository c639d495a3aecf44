"""Command line for running and operating the app: `python -m localdev --help`.

Reads `local.settings.json` `Values` (from the current folder, else the app root) into the
environment first, as `func start` does; variables already in the environment win.

Exit codes: 0 done; 1 the command could not or would not do it (one `error: …` line says what failed, where and
the fix; `--debug` adds the traceback); 2 a usage error or a bad or missing setting (localdev/failures.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from localdev.errors import OperatorError
from shared import runtime
from shared.errors import SettingsError
from shared.runtime import QUIET_LOGGERS
from shared.settings import Settings
from shared.third_party_logs import demote_third_party_logs

if TYPE_CHECKING:
    from localdev.local_host import CycleSummary

APP_ROOT = Path(__file__).resolve().parent.parent
# `run --once` waits this long for scheduled deliveries: the first retries of a transient failure
# (TOKEN_REFRESH_RETRY_DELAY_MS, 30 s then doubling) come within it; an hour of back-off does not.
ONCE_MAX_WAIT_S = 120


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
    from localdev.preflight import require_connections_container
    from shared import runtime
    from shared.expiring_check import plan_check
    from shared.refresh_schedule import describe_rate
    from shared.times import format_time, utc_now

    require_connections_container(settings)
    threshold = utc_now() + timedelta(milliseconds=settings.expiration_threshold_ms)
    # Read everything before printing: a failure (Cosmos unreachable, a setting missing) must not
    # leave a table header on stdout that looks like an empty result.
    plan = plan_check(runtime.connection_store(), runtime.state_store(), threshold, settings)
    print(f"Connections whose token expires by {format_time(threshold)} (dry run: nothing is published):")
    print(
        f"{'connectionId':<36} {'integrationId':<20} {'tenantId':<20} {'status':<10} {'expiresAt':<24}"
        + (" notBefore" if settings.scheduling else "")
    )
    for connection, not_before in plan.requests:
        # No expiresAt: a token without expiry, due by TOKEN_REFRESH_MAX_AGE_MS.
        expires_at = "no expiry" if connection.expires_at is None else format_time(connection.expires_at)
        when = (" " + (format_time(not_before) if not_before else "at once")) if settings.scheduling else ""
        print(
            f"{connection.connection_id!s:<36} {connection.integration_id!s:<20} {connection.tenant_id!s:<20} "
            f"{connection.status or '-':<10} {expires_at:<24}{when}".rstrip()
        )
    print(f"{len(plan.requests)} connection(s) would be refreshed.")
    if plan.waiting:
        print(f"{plan.waiting} more are scheduled by an earlier check and still waiting for their time.")
    paced = [schedule for schedule in plan.schedules if schedule.paced and schedule.scheduled]
    if paced:
        print("Schedule (TOKEN_REFRESH_RATE_LIMITS / TOKEN_REFRESH_SPREAD_MS):")
        print(f"  {'integrationId':<20} {'limit':<10} {'count':>6} {'first':<24} {'last':<24} late")
        for schedule in paced:
            first, last = (
                format_time(datetime.fromtimestamp(moment / 1000, UTC))
                for moment in (schedule.first_ms, schedule.last_ms)
            )
            print(
                f"  {schedule.integration_id!s:<20} {describe_rate(schedule.rate_per_s):<10} {schedule.scheduled:>6} "
                f"{first:<24} {last:<24} {schedule.late}"
            )
    return 0


def _command_run(settings: Settings, args: argparse.Namespace) -> int:
    from localdev.local_host import LocalHost
    from localdev.preflight import require_connections_container
    from shared import runtime

    try:
        require_connections_container(settings)  # before anything is consumed: a message would fail on every delivery
    except Exception as error:
        from localdev.failures import explain
        from shared.cosmos_errors import is_store_outage

        # `run` keeps running, as the Functions host does: an outage of Cosmos DB as it starts is ridden out by the
        # check's own retries. A wrong key, name or certificate, and any failure of `run --once`, stops it.
        if args.once or not is_store_outage(error):
            raise
        logging.getLogger(__name__).warning("%s; `run` goes on: the check retries", explain(error, settings))
    host = LocalHost(
        settings,
        queue_prefix=args.queue_prefix,
        workers=args.workers,
        scheduled_wait_s=args.max_wait if args.once else None,
    )
    if args.once:
        try:
            summary = host.run_once()
        finally:
            host.close()
            runtime.reset()
        _print_summary(summary, args.max_wait)
        if summary.problems:
            raise OperatorError(f"the cycle did not end cleanly: {', '.join(summary.problems)} (see above)")
        return 0

    signal.signal(signal.SIGTERM, lambda *_: host.stop())
    try:
        host.run_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        runtime.reset()
    return 0


def _print_summary(summary: CycleSummary, max_wait: float) -> None:
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
    if summary.check_failures:
        last = summary.check_failures[-1]
        print(f"  check failed: {last.function} on every delivery ({len(summary.check_failures)}): {last.reason}")
    for letter in summary.dead_letters:
        print(f"  dead-lettered: {letter.function} message {letter.message_id}: {letter.reason}")
    if summary.dead_lettered:
        print("  `python -m localdev dead-letters` lists them; fix the cause, then `dead-letters --replay`")
    if summary.still_scheduled:
        print(
            f"  still scheduled: {summary.still_scheduled} delivery(ies) (retries after transient failures, or paced "
            f"requests) not due within --max-wait {max_wait:g} s; they stay queued: `python -m localdev run` "
            "delivers them at their time and logs each outcome"
        )


def _command_trigger(settings: Settings, args: argparse.Namespace) -> int:
    from localdev.operator_commands import operator_publisher, trigger_check
    from shared import runtime

    publisher = None
    try:
        publisher = operator_publisher(settings)
        return trigger_check(settings, publisher, force=args.force)
    finally:
        if publisher is not None:
            publisher.close()
        runtime.reset()


def _command_refresh(settings: Settings, args: argparse.Namespace) -> int:
    from localdev.operator_commands import operator_publisher, request_refresh
    from localdev.preflight import require_connections_container
    from shared import runtime

    require_connections_container(settings)

    def connections_container():
        database = runtime.cosmos_client().get_database_client(settings.cosmos_database)
        return database.get_container_client(settings.cosmos_connections_container)

    publishers = []

    def publisher():
        publishers.append(operator_publisher(settings))
        return publishers[-1]

    try:
        return request_refresh(
            settings,
            connections_container,
            publisher,
            integration_id=args.integration_id,
            connection_id=args.connection_id,
            tenant_id=args.tenant,
            force=args.force,
            state_store=runtime.state_store,
        )
    finally:
        for built in publishers:
            built.close()
        runtime.reset()


def _command_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from localdev.operator_commands import QUEUE_EVENT_TYPES, dead_letters

    transport = args.transport or ("service-bus" if settings.service_bus_configured else "rabbitmq")
    return dead_letters(
        settings,
        queues=[args.queue] if args.queue else list(QUEUE_EVENT_TYPES),
        transport=transport,
        replay=args.replay,
        limit=args.limit,
        queue_prefix=args.queue_prefix,
    )


def _check_dead_letters_args(args: argparse.Namespace) -> None:
    if args.queue_prefix is not None and args.transport == "service-bus":
        args.subparser.error("--queue-prefix names the local host's RabbitMQ queues; it does not apply to service-bus")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _limit(text: str) -> int:
    from localdev.operator_commands import MAX_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LIMIT}, not {value}")
    return value


def _identifier(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localdev", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="on a failure, print its traceback before the error line")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the three functions locally with RabbitMQ as the transport")
    run.add_argument("--once", action="store_true", help="one full cycle, print a summary, exit")
    run.add_argument(
        "--max-deliveries",
        type=_positive_int,
        help="deliveries per message before it is dead-lettered (sets TOKEN_REFRESH_MAX_DELIVERY_COUNT, default 10)",
    )
    run.add_argument(
        "--max-wait",
        metavar="SECONDS",
        type=_positive_int,
        default=ONCE_MAX_WAIT_S,
        help=f"--once: wait at most this long for scheduled deliveries (retries, paced requests); what is not due "
        f"by then stays queued for the next run, and the exit code is 1 (default {ONCE_MAX_WAIT_S})",
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

    trigger = commands.add_parser(
        "trigger",
        help="publish one integration.token.check-expiring now (as the timer does, ignoring its cadence)",
    )
    trigger.add_argument(
        "--force", action="store_true", help="publish even when TOKEN_REFRESH_ENABLED=false (refused otherwise)"
    )
    trigger.set_defaults(handler=_command_trigger, subparser=trigger)

    refresh = commands.add_parser(
        "refresh",
        help="request one connection's refresh now (publishes the check's refresh-requested event for it)",
    )
    refresh.add_argument("integration_id", metavar="INTEGRATION_ID", type=_identifier, help="the integrationId")
    refresh.add_argument("connection_id", metavar="CONNECTION_ID", type=_identifier, help="the connection's id")
    refresh.add_argument(
        "--tenant", metavar="TENANT_ID", type=_identifier, help="the connection's tenant (needed when several match)"
    )
    refresh.add_argument(
        "--force",
        action="store_true",
        help="publish even when the connection's status is in TOKEN_REFRESH_SKIP_STATUSES (refused otherwise)",
    )
    refresh.set_defaults(handler=_command_refresh, subparser=refresh)

    dead = commands.add_parser(
        "dead-letters", help="list (without consuming) or replay dead-lettered messages of the trigger queues"
    )
    dead.add_argument(
        "--queue", choices=("check-expiring", "refresh-requested"), help="one trigger queue (default: both)"
    )
    dead.add_argument("--replay", action="store_true", help="put each dead letter back on its queue")
    dead.add_argument(
        "--limit", metavar="N", type=_limit, default=100, help="at most this many messages per queue (default 100)"
    )
    dead.add_argument(
        "--transport",
        choices=("rabbitmq", "service-bus"),
        help="where to look (default: service-bus when configured, else rabbitmq, the local host)",
    )
    dead.add_argument(
        "--queue-prefix",
        metavar="PREFIX",
        help="prefix of the local host's RabbitMQ queues, as given to `run` (default integration-token-refresh.)",
    )
    dead.set_defaults(handler=_command_dead_letters, subparser=dead, validate=_check_dead_letters_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "validate", None):
        args.validate(args)  # usage errors exit 2, before any setting is read
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pika's, the SDKs' and urllib3's own records at DEBUG: shown with -v only; a failure is
    # reported once, by the command's `error:` line.
    demote_third_party_logs(QUIET_LOGGERS)
    if getattr(args, "max_deliveries", None):
        os.environ["TOKEN_REFRESH_MAX_DELIVERY_COUNT"] = str(args.max_deliveries)
    from localdev.failures import report_failures

    loaded: list[Settings] = []  # for the error line's scrubber, once read
    return report_failures(lambda: _run_command(args, loaded), lambda: loaded[0] if loaded else None, debug=args.debug)


def _run_command(args: argparse.Namespace, loaded: list[Settings]) -> int:
    from localdev.errors import UsageError

    found = load_local_settings()
    try:
        # The commands use these same settings through shared.runtime: loaded (and the threshold
        # warned about) once. Reset first: an earlier main() in this process (tests) read other values.
        runtime.reset()
        loaded.append(runtime.settings())
        return args.handler(loaded[0], args)
    except SettingsError as error:
        if found is None:  # the usual cause: the local services' settings were never written
            searched = " or ".join(dict.fromkeys(str(folder) for folder in (Path.cwd(), APP_ROOT)))
            raise SettingsError(
                f"{error}. There is no local.settings.json in {searched}: `make services-up` "
                "writes one for the local services (or set the settings in the environment)"
            ) from None
        raise
    except UsageError as error:
        args.subparser.error(str(error))  # prints the command's usage; exits 2


if __name__ == "__main__":
    sys.exit(main())
