"""Timer: ticks every minute; publishes integration.token.check-expiring every TOKEN_REFRESH_INTERVAL_MS."""

import azure.functions as func

from shared import telemetry
from shared.check_timer import run_timer_tick


def main(timer: func.TimerRequest, context: func.Context) -> None:
    with telemetry.invocation(context, "check_expiring_timer"):
        run_timer_tick(past_due=timer.past_due)
