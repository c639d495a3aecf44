"""Reads OAuth connections from Cosmos DB (container `integration_connections`).

The query projects only ids, status and `oauth.expiresAt`: token values are never read. It runs
cross-partition and pages with continuation tokens, so callers can stream through any number of
matches one page at a time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.events import format_time, parse_time
from shared.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

# ISO strings are compared as text in the query, which is exact only for UTC ("Z"/"+00:00").
# A string with another offset can be off by up to 14 hours, so the query admits strings up to
# this much past the threshold and the exact comparison happens in Python on the parsed instant.
_MAX_UTC_OFFSET = timedelta(hours=14)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

EXPIRING_CONNECTIONS_QUERY = """
SELECT c.id, c.tenantId, c.integrationId, c.status, c.oauth.expiresAt AS expiresAt
FROM c
WHERE IS_DEFINED(c.oauth.expiresAt)
  AND ((IS_STRING(c.oauth.expiresAt) AND c.oauth.expiresAt <= @thresholdTextBound)
       OR (IS_NUMBER(c.oauth.expiresAt) AND c.oauth.expiresAt <= @thresholdEpochMs))
  AND (NOT IS_DEFINED(c.status) OR NOT ARRAY_CONTAINS(@skipStatuses, c.status))
""".strip()


class ExpiringConnection(BaseModel):
    """A connection whose token expires within the threshold (projection of the Cosmos document)."""

    model_config = ConfigDict(frozen=True)

    connection_id: str = Field(min_length=1)
    integration_id: str = Field(min_length=1)
    tenant_id: str = Field(min_length=1)
    status: str | None = None
    expires_at: datetime

    @field_validator("status", mode="before")
    @classmethod
    def _status_text(cls, value: Any) -> Any:
        return None if value is None else str(value)

    @field_validator("integration_id", "tenant_id", mode="before")
    @classmethod
    def _whole_numbers_as_text(cls, value: Any) -> Any:
        # Some writers store numeric tenant/integration ids; they address the same thing as text.
        # Booleans, objects and null stay invalid.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def parse_expires_at(value: Any) -> datetime:
    """`oauth.expiresAt` as stored: an ISO-8601 string or epoch milliseconds (int or float)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        return parse_time(value)
    raise ValueError(f"unsupported type {type(value).__name__}")


@dataclass
class ScanPage:
    """One page of query results: the connections due for refresh, the rows that could not be used
    (invalid documents, logged by id), and the continuation token to resume after this page."""

    connections: list[ExpiringConnection]
    invalid: int
    continuation: str | None


class InvalidConnectionDocument(ValueError):
    """A matching document lacks what a refresh needs (ids, a readable expiresAt)."""


def to_expiring_connection(
    row: dict[str, Any], threshold: datetime, skip_statuses: tuple[str, ...]
) -> ExpiringConnection | None:
    """Validate one query row: the connection when it is due, None when it is not (skipped status,
    or admitted only by the widened text bound). Raises InvalidConnectionDocument for unusable rows."""
    connection_id = row.get("id")
    status = row.get("status")
    if isinstance(status, str) and status.strip().lower() in skip_statuses:
        return None
    try:
        expires_at = parse_expires_at(row.get("expiresAt"))
    except (ValueError, TypeError, OverflowError, OSError) as error:
        raise InvalidConnectionDocument(
            f"oauth.expiresAt is not an ISO-8601 time or epoch milliseconds ({error.__class__.__name__})"
        ) from None
    if expires_at > threshold:
        return None  # admitted only by the query's widened text bound
    try:
        return ExpiringConnection(
            connection_id=connection_id,
            integration_id=row.get("integrationId"),
            tenant_id=row.get("tenantId"),
            status=status,
            expires_at=expires_at,
        )
    except ValidationError as error:
        fields = ", ".join(str(item["loc"][0]) for item in error.errors(include_input=False))
        raise InvalidConnectionDocument(f"missing or invalid {fields}") from None


class ConnectionStore:
    def __init__(self, container: Any, page_size: int = 200):
        self._container = container
        self._page_size = page_size

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionStore:
        from azure.cosmos import CosmosClient

        if not settings.cosmos_endpoint:
            raise SettingsError("COSMOS_ENDPOINT is not set; expected an https:// URL of the Cosmos account")
        if settings.cosmos_key is not None:
            credential: Any = settings.cosmos_key.get_secret_value()
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        if urlsplit(settings.cosmos_endpoint).hostname in _LOOPBACK_HOSTS:
            # The SDK skips TLS verification for a loopback emulator only; say so once, not per request.
            logger.info("Cosmos endpoint is a local emulator: TLS verification is off for it")
            for host in _LOOPBACK_HOSTS:
                warnings.filterwarnings("ignore", message=f"Unverified HTTPS request is being made to host '{host}'")
        client = CosmosClient(settings.cosmos_endpoint, credential=credential)
        container = client.get_database_client(settings.cosmos_database).get_container_client(
            settings.cosmos_connections_container
        )
        return cls(container, settings.page_size)

    def expiring_connection_pages(
        self,
        threshold: datetime,
        skip_statuses: tuple[str, ...],
        continuation: str | None = None,
    ) -> Iterator[ScanPage]:
        """Yield pages of connections with `oauth.expiresAt <= threshold`, across all partitions."""
        parameters = [
            {"name": "@thresholdTextBound", "value": format_time(threshold + _MAX_UTC_OFFSET)},
            {"name": "@thresholdEpochMs", "value": int(threshold.timestamp() * 1000)},
            {"name": "@skipStatuses", "value": list(skip_statuses)},
        ]
        pager = self._container.query_items(
            query=EXPIRING_CONNECTIONS_QUERY,
            parameters=parameters,
            enable_cross_partition_query=True,
            max_item_count=self._page_size,
        ).by_page(continuation)
        for page in pager:
            connections, invalid = [], 0
            for row in page:
                try:
                    connection = to_expiring_connection(row, threshold, skip_statuses)
                except InvalidConnectionDocument as error:
                    invalid += 1
                    logger.warning("Skipping connection %r: %s", row.get("id"), error)
                    continue
                if connection is not None:
                    connections.append(connection)
            yield ScanPage(connections, invalid, pager.continuation_token)
