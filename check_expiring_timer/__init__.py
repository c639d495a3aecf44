"""Timer: ticks every minute; publishes integration.token.check-expiring every TOKEN_REFRESH_INTERVAL_MS."""

import azure.functions as func

from shared.check_timer import run_timer_tick


def main(timer: func.TimerRequest) -> None:
    run_timer_tick(past_due=timer.past_due)
