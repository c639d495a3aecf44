"""Which Cosmos errors are an outage of the store (a later attempt may succeed) rather than a fault of the request."""

from __future__ import annotations

# Timeout, throttled (after the SDK's own retries), retry-with, and the server-side failures.
OUTAGE_STATUSES = frozenset({408, 429, 449, 500, 502, 503, 504})


def is_store_outage(error: BaseException) -> bool:
    """Cosmos could not be reached, dropped the answer, or answered with a passing failure."""
    # Imported on first use: the function modules load without the SDKs (a faster cold start).
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return not _misconfigured(error)
    from azure.cosmos.exceptions import CosmosHttpResponseError

    return isinstance(error, CosmosHttpResponseError) and error.status_code in OUTAGE_STATUSES


def describe_store_error(error: BaseException) -> str:
    """A short, secret-free description for a log line: the error's class and, for an answer, its status."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}" + (f" HTTP {status}" if status else "")


def _misconfigured(error: BaseException) -> bool:
    """A certificate that fails verification or a host name that does not resolve: a setting to fix
    (COSMOS_ENDPOINT, COSMOS_EMULATOR), not an outage to wait out."""
    import socket
    import ssl

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ssl.SSLError, socket.gaierror)) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return True
        inner = getattr(cause, "inner_exception", None)
        cause = inner if isinstance(inner, BaseException) else (cause.__cause__ or cause.__context__)
    return False
