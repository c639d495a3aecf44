"""Reads OAuth connections from Cosmos DB (container `integration_connections`). Never writes them.

Queries project only ids, status, `oauth.expiresAt` and the document timestamp `_ts`: token values
are never read. The scan runs cross-partition and pages with continuation tokens, so callers can
stream through any number of matches one page at a time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import InvalidConnectionDocumentError, SettingsError
from shared.settings import LOOPBACK_HOSTS, Settings
from shared.times import EPOCH_MS_FLOOR, format_time, parse_expires_at, utc_now

logger = logging.getLogger(__name__)

# ISO strings are compared as text in the query, which is exact only for UTC ("Z"/"+00:00").
# A string with another offset can be off by up to 14 hours, so the query admits strings up to
# this much past the threshold and the exact comparison happens in Python on the parsed instant.
_MAX_UTC_OFFSET = timedelta(hours=14)

_PROJECTION = "SELECT c.id, c.tenantId, c.integrationId, c.status, c.oauth.expiresAt AS expiresAt, c._ts FROM c"
# Text comparison also misses two kinds of string: a lower-case `t` separator sorts after every upper-case time of
# its day (the second line admits those of the bound's own day; earlier days sort lower anyway), and text that is
# no time at all ("soon") sorts after every digit (the third line admits strings that start with no digit, so the
# check logs them as unusable instead of never seeing them). Numbers are epoch seconds below @epochMsFloor, epoch
# milliseconds above (shared.times.EPOCH_MS_FLOOR).
_DUE_BY_EXPIRY = (
    "(IS_STRING(c.oauth.expiresAt) AND (c.oauth.expiresAt <= @thresholdTextBound"
    " OR (c.oauth.expiresAt >= @lowerCaseDayFloor AND c.oauth.expiresAt <= @lowerCaseTextBound)"
    " OR c.oauth.expiresAt >= @afterDigits))"
    " OR (IS_NUMBER(c.oauth.expiresAt) AND (c.oauth.expiresAt <= @thresholdEpochS"
    " OR (c.oauth.expiresAt >= @epochMsFloor AND c.oauth.expiresAt <= @thresholdEpochMs)))"
)
# Opt-in (TOKEN_REFRESH_MAX_AGE_MS): tokens without an expiry, refreshed when the document is old.
# IS_DEFINED tests that a refresh token exists without reading it.
_DUE_BY_AGE = (
    " OR ((NOT IS_DEFINED(c.oauth.expiresAt) OR IS_NULL(c.oauth.expiresAt))"
    " AND IS_DEFINED(c.oauth.refreshToken) AND NOT IS_NULL(c.oauth.refreshToken) AND c._ts <= @maxAgeCutoffTs)"
)
_NOT_SKIPPED = "(NOT IS_DEFINED(c.status) OR NOT ARRAY_CONTAINS(@skipStatuses, c.status))"


def expiring_connections_query(with_max_age: bool, soonest_first: bool = False) -> str:
    """The scan's Cosmos SQL: rows whose `oauth.expiresAt` (ISO string, epoch s or ms) is due and whose status is not
    skipped, projecting ids, status, expiresAt and `_ts` only (never a token value). `with_max_age` also admits
    tokens without expiry that have a refresh token and a document older than @maxAgeCutoffTs (epoch s).
    Parameters: the threshold's forms (see expiring_connection_pages), @skipStatuses and, with `with_max_age`,
    @maxAgeCutoffTs.
    `soonest_first` orders by expiresAt (pacing: shared.refresh_schedule). Cosmos orders by type first: tokens
    without expiry, then epoch-ms numbers, then ISO strings, each in ascending order."""
    due = _DUE_BY_EXPIRY + (_DUE_BY_AGE if with_max_age else "")
    order = " ORDER BY c.oauth.expiresAt" if soonest_first else ""
    return f"{_PROJECTION} WHERE ({due}) AND {_NOT_SKIPPED}{order}"


EXPIRING_CONNECTIONS_QUERY = expiring_connections_query(with_max_age=False)


class ExpiringConnection(BaseModel):
    """A connection due for refresh (projection of the Cosmos document). `expires_at` is None for a
    token without expiry selected by TOKEN_REFRESH_MAX_AGE_MS."""

    model_config = ConfigDict(frozen=True)

    connection_id: str = Field(min_length=1, max_length=1024)
    integration_id: str = Field(min_length=1, max_length=1024)
    tenant_id: str = Field(min_length=1, max_length=1024)
    status: str | None = None
    expires_at: datetime | None
    document_ts: int | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _status_text(cls, value: Any) -> Any:
        return None if value is None else str(value)

    @field_validator("integration_id", mode="before")
    @classmethod
    def _whole_numbers_as_text(cls, value: Any) -> Any:
        # Some writers store numeric integration ids; they name the same integration as text.
        # (tenantId is the partition key: it must be the string the platform stores.)
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass
class ScanPage:
    """One page of query results: the connections due for refresh, the rows that could not be used
    (invalid documents, logged by id), and the continuation token to resume after this page."""

    connections: list[ExpiringConnection]
    invalid: int
    continuation: str | None


@dataclass(frozen=True)
class ConnectionState:
    """What the refresh step re-reads just before calling integration-manager."""

    status: str | None
    expires_at: Any
    document_ts: int | None


def connection_from_row(row: dict[str, Any]) -> ExpiringConnection:
    """The one place a row of the connection projection becomes a connection (the check, and the
    operator's `refresh`). Raises InvalidConnectionDocumentError, naming the document's field."""
    raw_expiry = row.get("expiresAt")
    try:
        expires_at = None if raw_expiry is None else parse_expires_at(raw_expiry)
    except (ValueError, TypeError, OverflowError, OSError) as error:
        raise InvalidConnectionDocumentError(
            f"oauth.expiresAt is not an ISO-8601 time or an epoch number ({error.__class__.__name__}); it is never "
            "refreshed until its writer stores a usable expiry"
        ) from None
    try:
        return ExpiringConnection(
            connection_id=row.get("id"),
            integration_id=row.get("integrationId"),
            tenant_id=row.get("tenantId"),
            status=row.get("status"),
            expires_at=expires_at,
            document_ts=row.get("_ts") if isinstance(row.get("_ts"), int) else None,
        )
    except ValidationError as error:
        fields = ", ".join(
            _DOCUMENT_FIELDS.get(str(item["loc"][0]), str(item["loc"][0])) for item in error.errors(include_input=False)
        )
        raise InvalidConnectionDocumentError(f"missing or invalid {fields}") from None


def to_expiring_connection(
    row: dict[str, Any],
    threshold: datetime,
    skip_statuses: tuple[str, ...],
    max_age_cutoff_ts: int | None = None,
) -> ExpiringConnection | None:
    """Validate one query row: the connection when it is due, None when it is not (skipped status,
    or admitted only by the widened text bound). Raises InvalidConnectionDocumentError for unusable rows."""
    status = row.get("status")
    if isinstance(status, str) and status.strip().lower() in skip_statuses:
        return None
    if row.get("expiresAt") is None:
        document_ts = row.get("_ts") if isinstance(row.get("_ts"), int) else None
        if max_age_cutoff_ts is None or document_ts is None or document_ts > max_age_cutoff_ts:
            return None
    connection = connection_from_row(row)
    if connection.expires_at is not None and connection.expires_at > threshold:
        return None  # admitted only by the query's widened text bound
    return connection


_DOCUMENT_FIELDS = {"connection_id": "id", "integration_id": "integrationId", "tenant_id": "tenantId"}


def cosmos_client_from_settings(settings: Settings) -> Any:
    """The CosmosClient both stores use (shared.runtime builds it once per process): COSMOS_KEY when set, else
    DefaultAzureCredential; an HTTP pool sized for concurrent invocations, no urllib3 retries. Raises
    SettingsError when COSMOS_ENDPOINT is not set. With COSMOS_EMULATOR (loopback endpoints only) TLS is not
    verified."""
    from azure.cosmos import CosmosClient

    if not settings.cosmos_endpoint:
        raise SettingsError("COSMOS_ENDPOINT is not set; expected an https:// URL of the Cosmos account")
    if settings.cosmos_key is not None:
        credential: Any = settings.cosmos_key.get_secret_value()
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    if settings.cosmos_emulator:
        # Allowed only for loopback endpoints (see Settings): say so once, not per request.
        logger.info("COSMOS_EMULATOR=true: TLS verification is off for the local Cosmos emulator")
        for host in LOOPBACK_HOSTS:
            warnings.filterwarnings("ignore", message=f"Unverified HTTPS request is being made to host '{host}'")
    from azure.core.pipeline.transport import RequestsTransport
    from urllib3.util.retry import Retry

    from shared.http_pool import pooled_session

    # The SDK's own transport keeps the requests default of 10 connections (see shared.http_pool);
    # the rest is as azure-core sets up its session: proxy variables apply, urllib3 never retries.
    session = pooled_session(trust_env=True, max_retries=Retry(total=False, redirect=False, raise_on_status=False))
    transport = RequestsTransport(session=session)
    return CosmosClient(settings.cosmos_endpoint, credential=credential, transport=transport)


class ConnectionStore:
    """Read-only queries over the platform's connection container (COSMOS_CONNECTIONS_CONTAINER); it never writes a
    connection. Holds nothing but the container client, so one instance serves every invocation thread of the
    process (shared.runtime). `page_size`: rows per Cosmos page (TOKEN_REFRESH_PAGE_SIZE); `max_age_ms` > 0 also
    selects tokens without expiry whose document is older than that (TOKEN_REFRESH_MAX_AGE_MS)."""

    def __init__(self, container: Any, page_size: int = 200, max_age_ms: int = 0):
        self._container = container
        self._page_size = page_size
        self._max_age_ms = max_age_ms

    @classmethod
    def from_settings(cls, settings: Settings, cosmos_client: Any) -> ConnectionStore:
        """The store over COSMOS_DATABASE / COSMOS_CONNECTIONS_CONTAINER of `cosmos_client`. Does not check that
        the container exists: the first query fails if it does not."""
        container = cosmos_client.get_database_client(settings.cosmos_database).get_container_client(
            settings.cosmos_connections_container
        )
        return cls(container, settings.page_size, settings.max_age_ms)

    def expiring_connection_pages(
        self,
        threshold: datetime,
        skip_statuses: tuple[str, ...],
        continuation: str | None = None,
        now: datetime | None = None,
        soonest_first: bool = False,
    ) -> Iterator[ScanPage]:
        """Yield one ScanPage per Cosmos page of the connections due by `threshold` (aware), across all partitions.
        Lazy: a page is queried only when the previous one has been consumed. Rows with a status in
        `skip_statuses` (case-insensitive) are left out; invalid documents are counted in `ScanPage.invalid` and
        logged by id, never raised. `continuation` resumes a scan after the page that returned it; `now` is the
        reference time for TOKEN_REFRESH_MAX_AGE_MS (default: the current time); `soonest_first` orders the scan by
        expiresAt (see expiring_connections_query). Cosmos errors propagate."""
        text_bound = format_time(threshold + _MAX_UTC_OFFSET)
        parameters = [
            {"name": "@thresholdTextBound", "value": text_bound},
            {"name": "@lowerCaseDayFloor", "value": text_bound[:10] + "t"},
            {"name": "@lowerCaseTextBound", "value": text_bound.replace("T", "t").replace("Z", "z")},
            {"name": "@afterDigits", "value": ":"},  # the character after "9"
            {"name": "@thresholdEpochS", "value": int(threshold.timestamp())},
            {"name": "@epochMsFloor", "value": EPOCH_MS_FLOOR},
            {"name": "@thresholdEpochMs", "value": int(threshold.timestamp() * 1000)},
            {"name": "@skipStatuses", "value": list(skip_statuses)},
        ]
        max_age_cutoff_ts = None
        if self._max_age_ms > 0:
            # `_ts` is in epoch seconds.
            max_age_cutoff_ts = int((now or utc_now()).timestamp() - self._max_age_ms / 1000)
            parameters.append({"name": "@maxAgeCutoffTs", "value": max_age_cutoff_ts})
        pager = self._container.query_items(
            query=expiring_connections_query(with_max_age=max_age_cutoff_ts is not None, soonest_first=soonest_first),
            parameters=parameters,
            enable_cross_partition_query=True,
            max_item_count=self._page_size,
        ).by_page(continuation)
        for page in pager:
            connections, invalid = [], 0
            for row in page:
                try:
                    connection = to_expiring_connection(row, threshold, skip_statuses, max_age_cutoff_ts)
                except InvalidConnectionDocumentError as error:
                    invalid += 1
                    logger.warning("Skipping connection %r: %s", row.get("id"), error)
                    continue
                if connection is not None:
                    connections.append(connection)
            yield ScanPage(connections, invalid, pager.continuation_token)

    def current_state(self, tenant_id: str, connection_id: str) -> ConnectionState | None:
        """The connection's status, expiry and version now (None when it no longer exists)."""
        rows = list(
            self._container.query_items(
                "SELECT c.status, c.oauth.expiresAt AS expiresAt, c._ts FROM c "
                "WHERE c.id = @id AND c.tenantId = @tenantId",
                parameters=[{"name": "@id", "value": connection_id}, {"name": "@tenantId", "value": tenant_id}],
                partition_key=tenant_id,
            )
        )
        if not rows:
            return None
        row = rows[0]
        return ConnectionState(row.get("status"), row.get("expiresAt"), row.get("_ts"))
