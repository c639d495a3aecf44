"""Systemic-failure detection: many connections failing the same way is one problem, not N.

Every failed refresh that is not about the connection itself (shared.failure_classes: systemic, or
transient after all retries) is counted in the state store under its signature (HTTP status and
error code). When TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD different connections have failed so within
TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS, exactly one invocation logs one ERROR (what, how many, what
to check) and publishes one `integration.token.refresh.systemic-failure` event; the per-connection
lines that follow drop to INFO. Nothing is recorded against the connections, so recovery needs no
one: once the cause is fixed, the next check asks again and the refreshes succeed.

Failures of the connection's own kind are counted too (count_connection_failure): most of a wave
failing with one connection code is ours, not the connections'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from shared.events import SystemicFailureData, make_event
from shared.failure_classes import FailureKind
from shared.ids import alarm_event_id
from shared.manager_client import RefreshOutcome
from shared.messaging import EventPublisher
from shared.settings import Settings
from shared.state_store import WAVE_KEYS_KEPT, FailureWave, StateStore
from shared.times import now_ms, utc_now

logger = logging.getLogger(__name__)

ALARM = "systemic_failure"  # customDimensions.alarm in Application Insights (docs/operations.md)


@dataclass(frozen=True)
class WaveReport:
    """What count_failure did with one failure: the wave it was counted in, or None when it could not be counted
    (counting is best effort)."""

    wave: FailureWave | None

    @property
    def already_alarmed(self) -> bool:
        """The alarm of this wave was raised before: per-connection lines need not shout."""
        return self.wave is not None and self.wave.alarmed and not self.wave.raised_now


def signature(outcome: RefreshOutcome) -> str:
    """What "failed the same way" means: HTTP status (`-` without an answer) and error code, e.g.
    `401:unauthorized`. Keys the wave document and the alarm's event id."""
    return f"{outcome.http_status if outcome.http_status is not None else '-'}:{outcome.error_code}"


def count_failure(
    outcome: RefreshOutcome, key: str, states: StateStore, publisher: EventPublisher, settings: Settings
) -> WaveReport:
    """Count one connection's failure in its wave; raise the alarm when this one crosses the threshold.
    Best effort: a store or broker problem here never costs the connection's outcome event."""
    now = now_ms()
    try:
        wave = states.note_failure_wave(
            signature(outcome),
            key,
            now,
            settings.systemic_failure_window_ms,
            settings.systemic_failure_threshold,
        )
    except Exception as error:  # noqa: BLE001 - the alarm is an extra; the outcome is already out
        logger.warning("Could not count a refresh failure towards systemic-failure detection: %s", type(error).__name__)
        return WaveReport(None)
    if wave is not None and wave.raised_now:
        raise_alarm(outcome, wave, publisher, settings)
    return WaveReport(wave)


def count_connection_failure(
    outcome: RefreshOutcome, key: str, states: StateStore, publisher: EventPublisher, settings: Settings
) -> tuple[RefreshOutcome, WaveReport]:
    """Count a failure of the connection's own kind (`invalid_grant`, `connection_not_found`, ...) in its wave,
    before it is reported. One such failure is the connection's; most of a wave failing with the same code is
    ours (INTEGRATION_MANAGER_URL pointing at another environment, a provider's rotated client secret). When the
    wave has TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD connections and more than half of the requests that ended
    since its first failure (within TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS), the alarm is raised once, the
    wave's failures are no longer held against their connections (StateStore.hold_failures: the next check asks
    again), and this one and the rest of the wave are reported as systemic (retryable). Returns the outcome to
    report and the wave. Best effort, as count_failure."""
    now = now_ms()
    try:
        # Never raised by the count alone (threshold beyond any count): "most of a wave" is decided below.
        wave = states.note_failure_wave(
            signature(outcome), key, now, settings.systemic_failure_window_ms, WAVE_KEYS_KEPT + 1
        )
        if wave is None or wave.connections < settings.systemic_failure_threshold:
            return outcome, WaveReport(wave)
        if not wave.alarmed:
            # Requests that ended since the wave's first failure, + this one, whose claim ends after the report.
            ended = states.outcomes_since(wave.window_start_ms) + 1
            if 2 * wave.connections <= ended:
                return outcome, WaveReport(wave)  # a few connections among many: each one's own failure
            wave = replace(wave, alarmed=True, raised_now=states.alarm_wave(signature(outcome), now))
        states.hold_failures(outcome.error_code or "", wave.window_start_ms, settings.failure_cooldown_ms)
    except Exception as error:  # noqa: BLE001 - the alarm is an extra; the outcome must still go out
        logger.warning("Could not count a refresh failure towards systemic-failure detection: %s", type(error).__name__)
        return outcome, WaveReport(None)
    ours = replace(
        outcome,
        kind=FailureKind.SYSTEMIC,
        check=f"{MOST_OF_A_WAVE_CHECK} (it answered {outcome.error_code} for most connections at once)",
    )
    if wave.raised_now:
        raise_alarm(ours, wave, publisher, settings)
    return ours, WaveReport(wave)


# What to check when most connections fail with a connection's own code at once.
MOST_OF_A_WAVE_CHECK = (
    "INTEGRATION_MANAGER_URL (another environment?) and the provider's client credentials at integration-manager"
)


def raise_alarm(outcome: RefreshOutcome, wave: FailureWave, publisher: EventPublisher, settings: Settings) -> None:
    """The alarm of a wave: one ERROR line (customDimensions alarm=systemic_failure: how many, what failed, what to
    check) and one systemic-failure event whose id is fixed per signature and window. Call it only when the wave
    was `raised_now`. A failed publish is logged as a WARNING, not raised: the ERROR line is the alarm of
    record."""
    window_min = settings.systemic_failure_window_ms / 60_000
    answered = (
        f"integration-manager answered HTTP {outcome.http_status}"
        if outcome.http_status is not None
        else "integration-manager could not be reached"
    )
    logger.error(
        "Systemic refresh failure: %d different connections failed the same way within %g min (%s, code=%s). "
        "This is not about the connections: none is recorded against them and the next check asks again. "
        "Check %s.",
        wave.connections,
        window_min,
        answered,
        outcome.error_code,
        outcome.check or "integration-manager",
        extra={"alarm": ALARM, "code": outcome.error_code, "httpStatus": outcome.http_status},
    )
    data = SystemicFailureData(
        detected_at=utc_now(),
        window_started_at=datetime.fromtimestamp(wave.window_start_ms / 1000, UTC),
        code=outcome.error_code or "refresh_failed",
        http_status=outcome.http_status,
        connections=wave.connections,
        check=outcome.check or "integration-manager",
    )
    # One id per signature and window: a re-published alarm is recognised as the same one.
    event_id = alarm_event_id(signature(outcome), data.window_started_at)
    try:
        publisher.publish([make_event(data, event_id=event_id)])
    except Exception as error:  # noqa: BLE001 - the ERROR line above is the alarm of record
        # A PublishError names the transport, host:port and what to check, never a secret.
        logger.warning("Could not publish the systemic-failure event: %s", error)
