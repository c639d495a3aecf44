"""Client of integration-manager's refresh endpoint.

`POST {INTEGRATION_MANAGER_URL}/api/v1/integrations/{integrationId}/connections/{connectionId}/refresh`

Ids come from documents and messages, so they are untrusted: each is percent-encoded as exactly one
path segment, ids that HTTP clients or servers would treat as dot segments are refused, and the
prepared URL is checked to be the intended endpoint before anything is sent. Redirects are never
followed (the bearer token must not travel to another URL). Response bodies are read only for a
short error code and a new expiry, never echoed (they could carry secrets).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from shared.errors import InvalidConnectionIdError, SettingsError
from shared.failure_classes import FailureKind, classify, classify_reported_failure
from shared.http_pool import pooled_session
from shared.settings import Settings
from shared.times import utc_now

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 256 * 1024
# OAuth/API error codes look like `invalid_grant` or `rate_limited`. Anything else (digits, dashes,
# mixed case) could be a token echoed back by a provider, so it never reaches an event or a log line.
_SAFE_ERROR_CODE = re.compile(r"^[a-z][a-z_]{0,39}$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]+$")
_DELTA_SECONDS = re.compile(r"^[0-9]+$", re.ASCII)


@dataclass(frozen=True)
class RefreshOutcome:
    """How a refresh call (or a retried run of calls) ended. A failure carries a safe error code, a message of ours
    (never the response body), its row of the classification table (`kind`, `check`) and the callee's
    Retry-After in seconds. `expires_at`: the new expiry, when known."""

    succeeded: bool
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    kind: FailureKind | None = None  # a failure's row in the classification table (shared.failure_classes)
    expires_at: datetime | None = None
    retry_after_s: float | None = None  # the callee's Retry-After, when it sent one
    # The app stopped waiting, but the call may have reached integration-manager, which may still be
    # working on it: a read timeout, a connection dropped after sending, a gateway's 502/504.
    may_be_in_flight: bool = False
    check: str | None = None  # what an operator should check (from the table), never a value

    @property
    def transient(self) -> bool:
        """Worth calling again soon: retried in the invocation, then by scheduled copies."""
        return self.kind is FailureKind.TRANSIENT

    @property
    def retryable(self) -> bool:
        """The event's `retryable`: a later attempt may succeed (everything but the connection's own failure)."""
        return not self.succeeded and self.kind is not FailureKind.CONNECTION

    @property
    def about_connection(self) -> bool:
        """Recorded against the connection (it is not requested again until its document changes)."""
        return self.kind is FailureKind.CONNECTION


def failed(
    error_code: str,
    error_message: str,
    http_status: int | None = None,
    *,
    may_be_in_flight: bool = False,
    retry_after_s: float | None = None,
) -> RefreshOutcome:
    """A failed call, classified by the table."""
    failure = classify(http_status, error_code)
    return RefreshOutcome(
        False,
        http_status=http_status,
        error_code=error_code,
        error_message=error_message,
        kind=failure.kind,
        may_be_in_flight=may_be_in_flight,
        retry_after_s=retry_after_s,
        check=failure.check,
    )


def path_segment(value: str, name: str) -> str:
    """Percent-encode an id as one path segment; refuse ids a URL would reinterpret."""
    if not value:
        raise InvalidConnectionIdError(f"{name} is empty")
    if set(value) <= {"."}:
        # "." and ".." are dot segments: clients and servers remove or resolve them, changing the path.
        raise InvalidConnectionIdError(f"{name} consists only of dots")
    return quote(value, safe="")


def refresh_path(integration_id: str, connection_id: str) -> str:
    """The refresh endpoint's path for the two ids, each percent-encoded as exactly one segment. Raises
    InvalidConnectionIdError for an empty or all-dots id."""
    return (
        f"/api/v1/integrations/{path_segment(integration_id, 'integrationId')}"
        f"/connections/{path_segment(connection_id, 'connectionId')}/refresh"
    )


class IntegrationManagerClient:
    """One HTTP session per process: connections to integration-manager are kept alive and reused."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ):
        self._base_url = base_url.rstrip("/")
        self._base_path = urlsplit(self._base_url).path
        # Where the calls go, for the log lines of failed calls (never the token: it is a header).
        self.location = manager_location(self._base_url)
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._session = session or pooled_session(trust_env=False)
        self._session.headers["Accept"] = "application/json"
        self._session.headers["User-Agent"] = "integration-token-refresh"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        self._session.trust_env = False  # no netrc/proxy surprises; the URL says where requests go

    @classmethod
    def from_settings(cls, settings: Settings) -> IntegrationManagerClient:
        """The process's client (shared.runtime): INTEGRATION_MANAGER_URL, the bearer token when set, and the
        connect and read timeouts (settings in ms). Raises SettingsError when INTEGRATION_MANAGER_URL is not
        set."""
        if not settings.integration_manager_url:
            raise SettingsError(
                "INTEGRATION_MANAGER_URL is not set; expected the http(s) base URL of integration-manager"
            )
        token = settings.integration_manager_token
        return cls(
            settings.integration_manager_url,
            token.get_secret_value() if token else None,
            settings.integration_manager_connect_timeout_ms / 1000,
            settings.integration_manager_timeout_ms / 1000,
        )

    def refresh_connection(
        self, integration_id: str, connection_id: str, tenant_id: str, idempotency_key: str | None = None
    ) -> RefreshOutcome:
        """One refresh call. `idempotency_key` (the refresh request's id) is sent as `Idempotency-Key` on every
        call for the same request, retries included: integration-manager should answer a repeated key with the
        first call's result instead of refreshing again (docs/failure-handling.md).

        A failed call is an outcome, not an exception: no answer, a timeout, an error status or an id that
        cannot be sent all come back as a classified failed RefreshOutcome. Raises RuntimeError only when the
        request cannot be built (the token or tenantId as a header), naming no value."""
        try:
            path = self._base_path + refresh_path(integration_id, connection_id)
        except InvalidConnectionIdError as error:
            return failed("invalid_connection_id", str(error))
        headers = {"X-Tenant-Id": tenant_id} if _PRINTABLE_ASCII.match(tenant_id) else {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        request = requests.Request(
            "POST", self._base_url.removesuffix(self._base_path) + path, json={"tenantId": tenant_id}, headers=headers
        )
        unbuildable = None
        try:
            prepared = self._session.prepare_request(request)
        except ValueError as error:  # requests' InvalidHeader, InvalidURL
            # Their texts quote the value (all of "Bearer <token>"): keep only the class name, and raise
            # outside this block so that the original is not even the new error's __context__.
            unbuildable = error.__class__.__name__
        if unbuildable is not None:
            raise RuntimeError(
                f"could not build the refresh request ({unbuildable}); check INTEGRATION_MANAGER_TOKEN "
                "and the request's tenantId"
            )
        if urlsplit(prepared.url).path != path:
            # Defence in depth: nothing an id contains may change which endpoint is called.
            return failed("invalid_connection_id", "ids would change the endpoint path")
        try:
            response = self._session.send(prepared, timeout=self._timeout, allow_redirects=False, stream=True)
        except requests.Timeout as error:
            return failed(
                "timeout",
                "integration-manager did not answer in time",
                may_be_in_flight=not isinstance(error, requests.ConnectTimeout),
            )
        except requests.RequestException as error:
            return failed(
                "network_error",
                f"could not reach integration-manager ({error.__class__.__name__})",
                may_be_in_flight=not _never_connected(error),
            )
        with response:
            body = _read_json(response)
        outcome = _outcome(response.status_code, body)
        if outcome.transient:
            outcome = replace(
                outcome,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
                # A gateway gave up on integration-manager, which may still be refreshing.
                may_be_in_flight=response.status_code in (502, 504),
            )
        return outcome

    def close(self) -> None:
        """Close the HTTP session and its pooled connections."""
        self._session.close()


def manager_location(base_url: str | None) -> str:
    """integration-manager's base URL for a log line: scheme, host, port and path only (no user, password or
    query, which may hold a secret; the token is a header, never in the URL)."""
    if not base_url:
        return "-"
    try:
        parts = urlsplit(base_url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port
        return "an unparsable INTEGRATION_MANAGER_URL"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


def _never_connected(error: requests.RequestException) -> bool:
    """The request provably never reached a server: the connection could not be made (refused, DNS,
    connect timeout). Anything later (reset, closed while reading) may have reached it."""
    from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError

    cause = error.args[0] if error.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(error, requests.ConnectTimeout) or isinstance(cause, NewConnectionError | NameResolutionError)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped at an hour; None when absent or odd."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):  # ASCII digits only: str.isdigit() also accepts "²", which float() refuses
        return min(float(value), 3600.0)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    delta = (moment - (now or utc_now())).total_seconds()
    return min(max(delta, 0.0), 3600.0)


def _read_json(response: requests.Response) -> Any:
    try:
        raw = b""
        for chunk in response.iter_content(64 * 1024):
            raw += chunk
            if len(raw) > MAX_RESPONSE_BYTES:
                return None
        return json.loads(raw) if raw else None
    except (requests.RequestException, ValueError, RecursionError):
        return None


def _outcome(status: int, body: Any) -> RefreshOutcome:
    code = _error_code(body)
    if 200 <= status < 300:
        if not _reports_failure(body):
            return RefreshOutcome(True, http_status=status, expires_at=_new_expiry(body))
        # A 2xx whose body says the refresh failed is that failure, classified by its code (never a success
        # that would close the request for the claim's lifetime).
        failure = classify_reported_failure(code)
        message = f"integration-manager answered HTTP {status}, reporting a failed refresh"
        message += f" ({code})" if code else ""
    else:
        failure = classify(status, code)
        message = f"integration-manager answered HTTP {status}" + (f" ({code})" if code else "")
    return RefreshOutcome(
        False,
        http_status=status,
        error_code=code or failure.default_code,
        error_message=message,
        kind=failure.kind,
        check=failure.check,
    )


def _reports_failure(body: Any) -> bool:
    """A 2xx body that reports a failure in one of the common envelope shapes: `success`/`ok` false, a non-empty
    `error`, or `status` "error"/"failed"."""
    if not isinstance(body, dict):
        return False
    if body.get("success") is False or body.get("ok") is False:
        return True
    if body.get("error"):
        return True
    status = body.get("status")
    return isinstance(status, str) and status.strip().lower() in ("error", "failed", "failure")


def _error_code(body: Any) -> str | None:
    """A short machine code such as `invalid_grant` from common error shapes; never free text."""
    if not isinstance(body, dict):
        return None
    candidates = [body.get("code"), body.get("error")]
    if isinstance(body.get("error"), dict):
        candidates.append(body["error"].get("code"))
    for candidate in candidates:
        if isinstance(candidate, str) and _SAFE_ERROR_CODE.match(candidate):
            return candidate
    return None


def _new_expiry(body: Any) -> datetime | None:
    from shared.times import parse_expires_at

    if not isinstance(body, dict):
        return None
    for holder in (
        body,
        body.get("oauth"),
        body.get("data"),
        (body.get("data") or {}).get("oauth") if isinstance(body.get("data"), dict) else None,
    ):
        if isinstance(holder, dict) and "expiresAt" in holder:
            try:
                return parse_expires_at(holder["expiresAt"])
            except (ValueError, TypeError, OverflowError, OSError):
                return None
    return None
