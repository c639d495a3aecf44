"""Every deterministic id the app derives (UUIDv5 under fixed namespaces, so ids are stable across
processes, hosts and deployments): the same input always gives the same id, which is what makes
duplicates recognisable (docs/events.md)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol

from shared.times import format_time

_KEY_NAMESPACE = uuid.UUID("0e1b7d2c-5a6f-4c3e-9f8a-2b7c6d5e4f30")
_REFRESH_REQUEST_NAMESPACE = uuid.UUID("5b0f7c1e-8d1e-4b7a-9a55-3f6a2a0e6c11")
_OUTCOME_NAMESPACE = uuid.UUID("a3c1f0d2-6e4b-4f7a-8c9d-1b2e3f4a5c6d")
_ALARM_NAMESPACE = uuid.UUID("7d3e9b1a-2c4f-4e6a-8b5d-9f0a1c2e3d4b")
_FOLLOW_UP_NAMESPACE = uuid.UUID("c6a4e2b8-3f1d-4d5c-9e7a-5b8c1d2e3f60")


class NamesAConnection(Protocol):
    """Anything with the three ids of a connection (an event payload, a selected connection)."""

    @property
    def tenant_id(self) -> str:
        """The tenant (`tenantId`, the Cosmos partition key)."""

    @property
    def integration_id(self) -> str:
        """The integration (`integrationId`), e.g. `salesforce`."""

    @property
    def connection_id(self) -> str:
        """The connection document's `id`."""


def connection_key(tenant_id: str, integration_id: str, connection_id: str) -> str:
    """A short, id-safe key for a connection (Cosmos ids cannot hold / \\ ? # and are <= 255 chars)."""
    return uuid.uuid5(_KEY_NAMESPACE, "\x1f".join((tenant_id, integration_id, connection_id))).hex


def text_key(text: str) -> str:
    """A short, id-safe key for any text (e.g. a failure signature)."""
    return uuid.uuid5(_KEY_NAMESPACE, text).hex


def refresh_request_id(
    connection: NamesAConnection, expires_at: datetime | None, document_ts: int | None = None
) -> str:
    """Deterministic id: the same connection with the same expiresAt always gives the same id.
    A token without expiry is identified by its document version (`_ts`) instead."""
    version = format_time(expires_at) if expires_at is not None else f"ts:{document_ts}"
    key = "\x1f".join((connection.tenant_id, connection.integration_id, connection.connection_id, version))
    return str(uuid.uuid5(_REFRESH_REQUEST_NAMESPACE, key))


def outcome_event_id(request_id: str, attempt_round: int, event_type: str) -> str:
    """Deterministic id of a request's outcome event: publishing the same outcome again (a redelivery
    finishing an earlier invocation's story) gives the same id, so consumers can de-duplicate on it.
    `attempt_round` counts the times a later check asked again for a request that had ended retryable."""
    return str(uuid.uuid5(_OUTCOME_NAMESPACE, "\x1f".join((request_id, str(attempt_round), event_type))))


def alarm_event_id(signature: str, window_started_at: datetime) -> str:
    """One systemic-failure event per kind of failure and window: a re-published alarm has the same id."""
    return str(uuid.uuid5(_ALARM_NAMESPACE, f"{signature}\x1f{format_time(window_started_at)}"))


def follow_up_check_id(scan_timestamp: datetime, continuation: str) -> str:
    """Deterministic id of the follow-up check a scan hands off to at `continuation`: a check run again after an
    error (a redelivery) hands off with the same id, so it continues one chain instead of starting a second."""
    return str(uuid.uuid5(_FOLLOW_UP_NAMESPACE, f"{format_time(scan_timestamp)}\x1f{continuation}"))


def idempotency_key(request_id: str, attempt_round: int) -> str:
    """The Idempotency-Key of every call for a request: its id, and the round when a later check asked
    again after it had ended retryable (a new attempt, not a repeat of the last)."""
    return request_id if attempt_round == 0 else f"{request_id}.{attempt_round}"
