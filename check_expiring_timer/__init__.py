"""Timer: ticks every minute; publishes integration.token.check-expiring every TOKEN_REFRESH_INTERVAL_MS."""

import azure.functions as func

from shared import telemetry
from shared.check_timer import run_timer_tick


def main(timer: func.TimerRequest, context: func.Context) -> None:
    """Functions entry point of the timer (every minute, function.json): one tick of
    shared.check_timer.run_timer_tick, with the invocation's log fields. It publishes check-expiring only when
    TOKEN_REFRESH_INTERVAL_MS has passed. An exception fails the invocation; the next tick tries again."""
    with telemetry.invocation(context, "check_expiring_timer"):
        run_timer_tick(past_due=timer.past_due)
