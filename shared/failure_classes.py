"""Whose problem is a failed refresh call? The classification table (docs/failure-handling.md).

- `connection`: about *this* connection (its grant was refused, it is gone). Retrying cannot help;
  it is recorded against the connection, which is not requested again until its document changes.
- `transient`: a passing condition (network, timeouts, 408, 409, 429, 5xx). Retried.
- `systemic`: about us or integration-manager (our credentials, a wrong URL or path, a redirect, a
  request the manager does not accept). It would fail the same way for every connection, so it is
  never recorded against one: `refresh.failed` says `retryable: true`, the next check asks again,
  and many of them at once raise one alarm (shared.failure_waves).

Only a known connection error code makes a 4xx the connection's fault; without one, a 4xx is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailureKind(StrEnum):
    """Whose problem a failed call is (see the module docstring). Stored and compared as the string value."""

    CONNECTION = "connection"
    TRANSIENT = "transient"
    SYSTEMIC = "systemic"


# Error codes integration-manager (or the provider behind it, RFC 6749 `invalid_grant`) uses for a
# failure of this connection itself: the user has to reconnect it, or it no longer exists.
CONNECTION_ERROR_CODES = frozenset(
    {
        "invalid_grant",
        "connection_not_found",
        "connection_deleted",
        "connection_revoked",
        "connection_disabled",
        "no_refresh_token",
        "refresh_token_expired",
        "refresh_token_revoked",
        "reauthorization_required",
        "invalid_connection_id",  # the app's own: an id that cannot be sent as a path segment
    }
)


@dataclass(frozen=True)
class FailureClass:
    """One row of the table: the kind, the error code an event carries when the answer had none, and what an
    operator should check (a setting or a service, never a value)."""

    kind: FailureKind
    default_code: str  # the event's error code when the answer carried none
    check: str  # what to check, for the one line an operator reads (never a value)


def classify(http_status: int | None, error_code: str | None) -> FailureClass:
    """The row of the table for a failed call: `http_status` None for a call that got no answer
    (`error_code` then says why: network_error, timeout, invalid_connection_id)."""
    if error_code in CONNECTION_ERROR_CODES and (http_status is None or _is_client_error(http_status)):
        return FailureClass(FailureKind.CONNECTION, "refresh_rejected", "the connection: it must be reconnected")
    if http_status is None:
        return FailureClass(
            FailureKind.TRANSIENT,
            error_code or "network_error",
            "that integration-manager is up and reachable at INTEGRATION_MANAGER_URL",
        )
    for statuses, failure in _HTTP_ROWS:
        if http_status in statuses:
            return failure
    if http_status >= 500:
        return _SERVER_ERROR
    return FailureClass(
        FailureKind.SYSTEMIC,
        "refresh_rejected",
        "that this app's version speaks integration-manager's refresh API (the manager refused the request itself)",
    )


def _is_client_error(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 409, 429)


_SERVER_ERROR = FailureClass(FailureKind.TRANSIENT, "server_error", "integration-manager's health and logs")

# Ordered rows: status set -> class. 2xx is a success and never classified.
_HTTP_ROWS: tuple[tuple[range | tuple[int, ...], FailureClass], ...] = (
    (
        range(300, 400),
        FailureClass(
            FailureKind.SYSTEMIC,
            "redirect_refused",
            "INTEGRATION_MANAGER_URL: it is redirected (use the final URL; redirects are never followed)",
        ),
    ),
    (
        (401,),
        FailureClass(
            FailureKind.SYSTEMIC, "unauthorized", "INTEGRATION_MANAGER_TOKEN: integration-manager does not accept it"
        ),
    ),
    (
        (403,),
        FailureClass(
            FailureKind.SYSTEMIC, "forbidden", "INTEGRATION_MANAGER_TOKEN: its identity may not refresh connections"
        ),
    ),
    (
        (404, 405, 410),
        FailureClass(
            FailureKind.SYSTEMIC,
            "endpoint_not_found",
            "INTEGRATION_MANAGER_URL: no refresh endpoint at its path (base path, API version)",
        ),
    ),
    ((408,), FailureClass(FailureKind.TRANSIENT, "timeout", "integration-manager's load")),
    ((409,), FailureClass(FailureKind.TRANSIENT, "conflict", "integration-manager: a refresh already in progress")),
    ((429,), FailureClass(FailureKind.TRANSIENT, "rate_limited", "integration-manager's rate limits")),
)

# Codes of a passing condition that integration-manager may report in a 2xx answer's body.
_TRANSIENT_REPORTED_CODES = frozenset(
    {"rate_limited", "timeout", "server_error", "temporarily_unavailable", "service_unavailable", "conflict"}
)


def classify_reported_failure(error_code: str | None) -> FailureClass:
    """The row for a failure integration-manager reported in the body of a 2xx answer (`{"success": false,
    "error": "invalid_grant"}`): the status says nothing, so the code alone decides. An unknown code is ours or the
    manager's (systemic): retried by the next check and counted towards the alarm, never held against the
    connection."""
    if error_code in CONNECTION_ERROR_CODES:
        return FailureClass(FailureKind.CONNECTION, "refresh_rejected", "the connection: it must be reconnected")
    if error_code in _TRANSIENT_REPORTED_CODES:
        return FailureClass(FailureKind.TRANSIENT, error_code, "integration-manager's health and logs")
    return FailureClass(
        FailureKind.SYSTEMIC,
        "refresh_failed",
        "integration-manager's logs: it answered 2xx but reported the refresh as failed",
    )


# A 2xx answer after which the connection's expiry did not move: the refresh is not done.
UNVERIFIED_REFRESH = FailureClass(
    FailureKind.SYSTEMIC,
    "refresh_unverified",
    "integration-manager: it answered 2xx but the connection's oauth.expiresAt did not move",
)
