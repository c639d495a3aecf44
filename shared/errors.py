"""The app's own errors, in one place, under one base: `except TokenRefreshError` catches every error
the app raises on purpose (and nothing a library raised)."""

from __future__ import annotations

from collections.abc import Sequence


class TokenRefreshError(Exception):
    """Base of every error the app raises on purpose. Messages never contain a secret."""


class SettingsError(TokenRefreshError, ValueError):
    """A setting is missing or malformed. The message names the setting and the expected form."""


class InvalidEventError(TokenRefreshError, ValueError):
    """A message is not a valid event of the expected type. Retrying it cannot help."""


class RequestIdConflictError(InvalidEventError):
    """A request id already claimed for another connection: the message is not what the check sent
    (a poison message: every delivery fails, then it is dead-lettered)."""


class InvalidConnectionIdError(TokenRefreshError, ValueError):
    """An id cannot be sent as a single path segment (e.g. only dots). Retrying cannot help."""


class InvalidConnectionDocumentError(TokenRefreshError, ValueError):
    """A Cosmos document matched the query but cannot be used (see docs/settings.md)."""


class RefreshRetryLaterError(TokenRefreshError, RuntimeError):
    """Transient failures used up this delivery's retries: the queue should redeliver the message."""


class PublishError(TokenRefreshError, RuntimeError):
    """At least one transport could not take the events. The message says which, where (host:port,
    namespace) and what to check; it gives no secrets. `errors`: each failed transport's error;
    `details`: one line per failed transport."""

    def __init__(self, message: str, errors: dict[str, BaseException] | None = None, details: str = ""):
        super().__init__(message)
        self.errors = errors or {}
        self.details = details or message


class UnroutableEventsError(PublishError):
    """RabbitMQ returned events published as mandatory: no queue is bound for their routing key."""

    def __init__(self, message: str, exchange: str, routing_keys: Sequence[str]):
        super().__init__(message)
        self.exchange = exchange
        self.routing_keys = list(routing_keys)
