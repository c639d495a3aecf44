"""Which Cosmos errors are an outage of the store (a later attempt may succeed) rather than a fault of the request."""

from __future__ import annotations

# Timeout, throttled (after the SDK's own retries), retry-with, and the server-side failures.
OUTAGE_STATUSES = frozenset({408, 429, 449, 500, 502, 503, 504})


def is_store_outage(error: BaseException) -> bool:
    """Cosmos could not be reached, dropped the answer, or answered with a passing failure."""
    # Imported on first use: the function modules load without the SDKs (a faster cold start).
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return True
    from azure.cosmos.exceptions import CosmosHttpResponseError

    return isinstance(error, CosmosHttpResponseError) and error.status_code in OUTAGE_STATUSES


def describe_store_error(error: BaseException) -> str:
    """A short, secret-free description for a log line: the error's class and, for an answer, its status."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}" + (f" HTTP {status}" if status else "")
