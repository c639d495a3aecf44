"""Application settings: the one place that reads and validates configuration.

Azure Functions exposes application settings as environment variables; `func start` and the local
CLI load `local.settings.json` `Values` into the environment first. A bad value fails fast with a
`SettingsError` that names the setting and the expected form, never the (possibly secret) value.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import SettingsError
from shared.secrets import unsafe_character

logger = logging.getLogger(__name__)

# Time a refresh needs between being selected and the token expiring: queueing, the refresh call,
# provider latency. A threshold shorter than interval + this margin can let tokens expire between checks.
SAFETY_MARGIN_MS = 5 * 60 * 1000

DAY_MS = 86_400_000

# host.json's limits that settings must fit in (tests/unit/test_settings.py checks these equal host.json):
# `extensions.serviceBus.maxAutoLockRenewalDuration` (00:05:00): the Functions host renews a message's lock this
# long, and a redelivery waits at most this long for an earlier delivery's calls to be over
# (shared/token_refresh.py TAKE_OVER_MAX_WAIT_MS); `functionTimeout` (00:10:00): an invocation runs at most this long.
LOCK_RENEWAL_MS = 5 * 60 * 1000
FUNCTION_TIMEOUT_MS = 10 * 60 * 1000
# check_expiring_timer ticks every minute (its function.json): checks are TOKEN_REFRESH_INTERVAL_MS rounded up to
# whole minutes apart (docs/settings.md#timer-cadence).
TIMER_TICK_MS = 60_000

# Defaults (docs/settings.md#defaults): an hourly check, and a threshold the risky-threshold warning accepts with
# room to spare: the interval + SAFETY_MARGIN_MS + a check's time budget (4 min) + one timer tick = 70 min.
DEFAULT_INTERVAL_MS = 3_600_000
DEFAULT_EXPIRATION_THRESHOLD_MS = 4_200_000
DEFAULT_SKIP_STATUSES = ("revoked", "disabled", "deleted")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

# An environment variable with one of these prefixes is meant for this app: one it does not know is most likely a
# typo that would silently leave the setting at its default (warn_about_unknown_settings).
SETTING_PREFIXES = ("TOKEN_REFRESH_", "INTEGRATION_MANAGER_", "COSMOS_", "RABBITMQ_")
# scripts/deploy.sh's own inputs: they share a prefix, are no app settings, and may be exported in the same shell.
DEPLOY_VARIABLES = ("COSMOS_ACCOUNT", "COSMOS_RESOURCE_GROUP")


class Settings(BaseSettings):
    """Every setting the app reads. Field aliases are the application-setting names."""

    model_config = SettingsConfigDict(case_sensitive=True, populate_by_name=True, extra="ignore")

    enabled: bool = Field(
        True,
        alias="TOKEN_REFRESH_ENABLED",
        description="master switch; `false` → the timer publishes nothing and logs `Token refresh is disabled` "
        "once per process",
    )
    interval_ms: int = Field(
        DEFAULT_INTERVAL_MS,
        alias="TOKEN_REFRESH_INTERVAL_MS",
        ge=1000,
        le=7 * DAY_MS,
        description="time between check-expiring runs (see [Cadence](#timer-cadence))",
    )
    expiration_threshold_ms: int = Field(
        DEFAULT_EXPIRATION_THRESHOLD_MS,
        alias="TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS",
        ge=0,
        le=365 * DAY_MS,
        description="refresh tokens that expire within this many ms of the check. At least the interval (refused "
        "below, see [Settings that must agree](#settings-that-must-agree)); a warning is logged when it is "
        "shorter than the interval + 5 min: a token could then expire between two checks. "
        "**Recommended: interval + 5 to 10 min** (the default: interval + 10 min, see [Defaults](#defaults))",
    )
    skip_statuses: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_SKIP_STATUSES,
        alias="TOKEN_REFRESH_SKIP_STATUSES",
        description="connections with one of these `status` values (case-insensitive) are never refreshed",
        json_schema_extra={
            "expected": "a comma-separated list of connection statuses, e.g. " + ",".join(DEFAULT_SKIP_STATUSES)
        },
    )
    page_size: int = Field(
        200,
        alias="TOKEN_REFRESH_PAGE_SIZE",
        ge=1,
        le=1000,
        description="Cosmos query page size = refresh-requested events per publish batch",
        json_schema_extra={"unit": "connections per page"},
    )
    check_time_budget_ms: int = Field(
        240_000,
        alias="TOKEN_REFRESH_CHECK_TIME_BUDGET_MS",
        ge=1,
        le=3_600_000,
        description="a check running longer hands the rest of the scan to a follow-up check "
        "(see [Scale](scale.md#scale))",
    )

    rate_limits: Annotated[dict[str, float], NoDecode] = Field(
        {},
        alias="TOKEN_REFRESH_RATE_LIMITS",
        description="refresh requests per second (or minute, hour) each integration may start; `*` covers the "
        "others. The check schedules each integration's requests at its rate, soonest-expiring first; empty: "
        "no limit (see [Pacing](#pacing))",
        json_schema_extra={
            "expected": "a comma-separated list of integrationId=N/s (or N/min, N/h), N above 0, e.g. "
            "salesforce=5/s,hubspot=2/s,*=50/s"
        },
    )
    spread_ms: int = Field(
        0,
        alias="TOKEN_REFRESH_SPREAD_MS",
        ge=0,
        le=DAY_MS,
        description="each refresh request is delayed by a random time within this window, never past its token's "
        "expiry minus 5 min; tokens already inside that margin go first, undelayed (see [Pacing](#pacing))",
        json_schema_extra={"zero": "no spread"},
    )

    cosmos_endpoint: str | None = Field(
        None,
        alias="COSMOS_ENDPOINT",
        description="Cosmos account URL (`https://…documents.azure.com:443/`)",
        json_schema_extra={"expected": "an https:// URL such as https://myaccount.documents.azure.com:443/"},
    )
    cosmos_key: SecretStr | None = Field(
        None,
        alias="COSMOS_KEY",
        description="account key; absent → `DefaultAzureCredential` (managed identity)",
        json_schema_extra={
            "expected": "the account's primary or secondary key (base64), without spaces; or unset for managed identity"
        },
    )
    cosmos_database: str = Field(
        "integrations",
        alias="COSMOS_DATABASE",
        min_length=1,
        description="database name",
        json_schema_extra={"expected": "a non-empty database name"},
    )
    cosmos_connections_container: str = Field(
        "integration_connections",
        alias="COSMOS_CONNECTIONS_CONTAINER",
        min_length=1,
        description="container name (partition key `/tenantId`)",
        json_schema_extra={"expected": "a non-empty container name"},
    )

    service_bus_connection_string: SecretStr | None = Field(
        None,
        alias="ServiceBusConnection",
        description="Service Bus connection string (key-based) …",
        json_schema_extra={
            "expected": "a Service Bus connection string: Endpoint=sb://<namespace>.servicebus.windows.net/;"
            "SharedAccessKeyName=...;SharedAccessKey=..."
        },
    )
    service_bus_namespace: str | None = Field(
        None,
        alias="ServiceBusConnection__fullyQualifiedNamespace",
        description="… or the namespace host name for managed identity. Set one, not both. "
        "The triggers use the same setting",
        json_schema_extra={"expected": "a host name such as mynamespace.servicebus.windows.net"},
    )

    rabbitmq_url: SecretStr | None = Field(
        None,
        alias="RABBITMQ_URL",
        description="`amqp://` / `amqps://` URL; absent → no RabbitMQ bridge",
        json_schema_extra={"expected": "an amqp:// or amqps:// URL"},
    )
    rabbitmq_exchange: str = Field(
        "integration.events",
        alias="RABBITMQ_EXCHANGE",
        min_length=1,
        description="the platform's topic exchange (declared durable if missing)",
        json_schema_extra={"expected": "a non-empty exchange name"},
    )

    integration_manager_url: str | None = Field(
        None,
        alias="INTEGRATION_MANAGER_URL",
        description="base URL of integration-manager (a path prefix is kept; no credentials, query or fragment)",
        json_schema_extra={"expected": "an http:// or https:// base URL without query, fragment or credentials"},
    )
    integration_manager_token: SecretStr | None = Field(
        None,
        alias="INTEGRATION_MANAGER_TOKEN",
        description="sent as `Authorization: Bearer …` when set",
        json_schema_extra={"expected": "the bearer token integration-manager accepts, on one line, without spaces"},
    )
    integration_manager_connect_timeout_ms: int = Field(
        5_000,
        alias="INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS",
        ge=100,
        le=60_000,
        description="TCP/TLS connect timeout of the refresh call",
    )
    integration_manager_timeout_ms: int = Field(
        30_000,
        alias="INTEGRATION_MANAGER_TIMEOUT_MS",
        ge=100,
        le=600_000,
        description="read timeout of the refresh call",
    )
    integration_manager_max_attempts: int = Field(
        3,
        alias="INTEGRATION_MANAGER_MAX_ATTEMPTS",
        ge=1,
        le=10,
        description="refresh calls per delivery for transient failures",
        json_schema_extra={"unit": "calls per delivery"},
    )
    integration_manager_backoff_initial_ms: int = Field(
        500,
        alias="INTEGRATION_MANAGER_BACKOFF_INITIAL_MS",
        ge=1,
        le=60_000,
        description="first back-off wait; doubles per attempt (max 10 s), plus up to as much jitter",
    )
    integration_manager_retry_budget_ms: int = Field(
        60_000,
        alias="INTEGRATION_MANAGER_RETRY_BUDGET_MS",
        ge=1000,
        le=300_000,
        description="every call of a delivery starts within this long after it claimed the request (waits for a "
        "Retry-After, an earlier call's in-flight window or a call slot count against it); a delivery that cannot "
        "call within it comes back later as a scheduled copy",
    )
    integration_manager_in_flight_ms: int = Field(
        60_000,
        alias="INTEGRATION_MANAGER_IN_FLIGHT_MS",
        ge=0,
        le=600_000,
        description="how long integration-manager may go on working on a call the app stopped waiting for (read "
        "timeout, connection dropped after sending, a gateway's 502/504): no new call for that request starts "
        "before this has passed and the connection has been re-read",
    )

    # Failure handling (docs/failure-handling.md)
    max_delivery_count: int = Field(
        10,
        alias="TOKEN_REFRESH_MAX_DELIVERY_COUNT",
        ge=1,
        le=100,
        description="deliveries of a refresh request, scheduled retries included; the last one reports a transient "
        "failure. Also the refresh queue's `MaxDeliveryCount` (for failures that raise)",
        json_schema_extra={"unit": "deliveries"},
    )
    # Doubling per retry up to RETRY_DELAY_MAX_MS: a short outage cannot use up the deliveries.
    retry_delay_ms: int = Field(
        30_000,
        alias="TOKEN_REFRESH_RETRY_DELAY_MS",
        ge=0,
        le=3_600_000,
        description="a transient failure (integration-manager's or Cosmos') comes back as a scheduled copy of the "
        "request this long after the first failed delivery, doubling per retry up to 15 min and up to a quarter of the "
        "time the token has left (Service Bus: a scheduled message; local host: a durable delay queue)",
        json_schema_extra={"zero": "the queue redelivers at once"},
    )
    failure_cooldown_ms: int = Field(
        DAY_MS,
        alias="TOKEN_REFRESH_FAILURE_COOLDOWN_MS",
        ge=0,
        le=365 * DAY_MS,
        description="a connection that failed permanently is not requested again for this long unless its token "
        "changes (a reconnect)",
        json_schema_extra={"zero": "off"},
    )
    claim_lease_ms: int = Field(
        600_000,
        alias="TOKEN_REFRESH_CLAIM_LEASE_MS",
        ge=1000,
        le=DAY_MS,
        description="how long a refresh claim protects an in-flight refresh: at least the calls window (see "
        "[Settings that must agree](#settings-that-must-agree))",
    )
    max_age_ms: int = Field(
        0,
        alias="TOKEN_REFRESH_MAX_AGE_MS",
        ge=0,
        le=3650 * DAY_MS,
        description="refresh tokens **without** `expiresAt` (but with a refresh token) when their document is older "
        "than this",
        json_schema_extra={"zero": "off"},
    )
    # Systemic failures (docs/failure-handling.md)
    systemic_failure_threshold: int = Field(
        5,
        alias="TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD",
        ge=1,
        le=200,
        description="this many different connections failing the same way (not about themselves: a stale "
        "`INTEGRATION_MANAGER_TOKEN`, a wrong URL, an outage) within the window raise one alarm: one ERROR line "
        "and one `systemic-failure` event",
        json_schema_extra={"unit": "connections"},
    )
    systemic_failure_window_ms: int = Field(
        900_000,
        alias="TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS",
        ge=60_000,
        le=DAY_MS,
        description="the window of that count",
    )
    cosmos_state_container: str = Field(
        "token_refresh_state",
        alias="COSMOS_STATE_CONTAINER",
        min_length=1,
        description="the app's own container (partition key `/id`, TTL on) for claims, failure records and the "
        "systemic-failure counts",
        json_schema_extra={"expected": "a non-empty container name"},
    )
    cosmos_emulator: bool = Field(
        False,
        alias="COSMOS_EMULATOR",
        description="`true` only for a loopback emulator endpoint: the SDK does not verify its TLS certificate. "
        "Refused for any other host; a loopback endpoint without it is refused too",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _blank_means_unset(cls, value: Any, info) -> Any:
        # App settings cannot be "deleted" in some UIs; an empty value means "use the default".
        if isinstance(value, str) and not value.strip():
            default = cls.model_fields[info.field_name].default
            return default
        return value.strip() if isinstance(value, str) else value

    @field_validator("skip_statuses", mode="before")
    @classmethod
    def _split_statuses(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return tuple(str(v).lower() for v in value)

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _parse_rate_limits(cls, value: Any) -> Any:
        return parse_rate_limits(value) if isinstance(value, str) else value

    # Before the checks of each secret's form (urlsplit silently drops tabs and line breaks).
    @field_validator("integration_manager_token", "cosmos_key", "rabbitmq_url", "service_bus_connection_string")
    @classmethod
    def _check_secret_characters(cls, value: SecretStr | None) -> SecretStr | None:
        # A line break or space pasted inside a secret breaks it later, in texts that quote it (requests'
        # InvalidHeader quotes the whole Authorization header): refuse it now, saying where, not what.
        if value is not None and (problem := unsafe_character(value.get_secret_value())):
            raise ValueError(problem)
        return value

    @field_validator("cosmos_endpoint")
    @classmethod
    def _check_cosmos_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "https" or not parts.hostname:
                raise ValueError("not an https:// URL")
        return value

    @field_validator("integration_manager_url")
    @classmethod
    def _check_manager_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("has a query or fragment")
        if parts.username or parts.password:
            # Credentials in a URL end up in logs and exception texts; use INTEGRATION_MANAGER_TOKEN.
            raise ValueError("contains credentials")
        return value.rstrip("/")

    @field_validator("rabbitmq_url")
    @classmethod
    def _check_rabbitmq_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parts = urlsplit(value.get_secret_value())
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError("not an amqp:// or amqps:// URL")
        return value

    @field_validator("service_bus_connection_string")
    @classmethod
    def _check_service_bus_connection_string(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            fields = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
            if not fields.get("Endpoint", "").startswith("sb://"):
                raise ValueError("is not a Service Bus connection string (no Endpoint=sb://...)")
        return value

    @field_validator("service_bus_namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or "/" in value or "." not in value):
            raise ValueError("is not a fully qualified host name")
        return value

    @model_validator(mode="after")
    def _check_emulator(self) -> Settings:
        # The Cosmos SDK silently skips TLS verification for localhost/127.0.0.1. Make that an
        # explicit choice, and never allow it for a real (non-loopback) account.
        if self.cosmos_endpoint:
            loopback = urlsplit(self.cosmos_endpoint).hostname in LOOPBACK_HOSTS
            if loopback and not self.cosmos_emulator:
                raise SettingsError(
                    "COSMOS_ENDPOINT is a loopback address, for which the Cosmos SDK does not verify TLS; "
                    "set COSMOS_EMULATOR=true to accept that for a local emulator"
                )
            if self.cosmos_emulator and not loopback:
                raise SettingsError(
                    "COSMOS_EMULATOR=true is only allowed with a loopback COSMOS_ENDPOINT (localhost or 127.0.0.1)"
                )
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.service_bus_connection_string and self.service_bus_namespace:
            raise SettingsError(
                "Both ServiceBusConnection and ServiceBusConnection__fullyQualifiedNamespace are set. "
                "Set only one: the connection string (key-based) or the namespace (managed identity)."
            )
        return self

    @model_validator(mode="after")
    def _check_settings_agree(self) -> Settings:
        # Settings each valid alone can contradict each other so that a request can never be answered
        # (docs/settings.md#settings-that-must-agree): every such contradiction, in one message.
        problems = [
            problem
            for problem in (
                self._in_flight_problem(),
                self._calls_window_problem(),
                self._claim_lease_problem(),
                self._threshold_problem(),
                self._rate_limits_problem(),
            )
            if problem
        ]
        if problems:
            raise SettingsError(" | ".join(problems))
        return self

    def _calls_window_text(self) -> str:
        return (
            f"calls window (INTEGRATION_MANAGER_RETRY_BUDGET_MS={self.integration_manager_retry_budget_ms} + "
            f"INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS={self.integration_manager_connect_timeout_ms} + "
            f"INTEGRATION_MANAGER_TIMEOUT_MS={self.integration_manager_timeout_ms} + "
            f"INTEGRATION_MANAGER_IN_FLIGHT_MS={self.integration_manager_in_flight_ms} = {self.calls_window_ms} ms)"
        )

    def _in_flight_problem(self) -> str | None:
        # shared/token_refresh.py _call_and_report: a delivery whose claim says an earlier call may still be in
        # flight for longer than INTEGRATION_MANAGER_RETRY_BUDGET_MS ends without calling. With scheduled retries the
        # copy comes after the in-flight window; with TOKEN_REFRESH_RETRY_DELAY_MS=0 the queue redelivers at once,
        # every delivery finds (nearly) the whole window left, and the last one is dead-lettered without an outcome.
        in_flight, budget = self.integration_manager_in_flight_ms, self.integration_manager_retry_budget_ms
        if self.retry_delay_ms > 0 or in_flight <= budget:
            return None
        return (
            f"{_setting_value('INTEGRATION_MANAGER_IN_FLIGHT_MS', in_flight)} is longer than "
            f"{_setting_value('INTEGRATION_MANAGER_RETRY_BUDGET_MS', budget)} while TOKEN_REFRESH_RETRY_DELAY_MS=0 "
            "(the queue redelivers at once): after a call that may still be in flight, every redelivery would end "
            "without calling and the request would be dead-lettered without an outcome. Set "
            f"INTEGRATION_MANAGER_IN_FLIGHT_MS to at most {budget}, INTEGRATION_MANAGER_RETRY_BUDGET_MS to at least "
            f"{in_flight}, or TOKEN_REFRESH_RETRY_DELAY_MS above 0"
        )

    def _calls_window_problem(self) -> str | None:
        # shared/token_refresh.py _take_over_from_earlier_delivery: a redelivery (a lost lock, a dead host) waits at
        # most the lock renewal for the earlier delivery's calls window to end; otherwise it ends without calling,
        # and so does every redelivery after it. The function timeout bounds the window too.
        limit, what = min(
            (
                LOCK_RENEWAL_MS,
                "the Service Bus lock renewal (host.json extensions.serviceBus.maxAutoLockRenewalDuration",
            ),
            (FUNCTION_TIMEOUT_MS, "the function timeout (host.json functionTimeout"),
        )
        window = self.calls_window_ms
        if window <= limit:
            return None
        return (
            f"The {self._calls_window_text()} is longer than {what}, {limit} ms): a redelivery after a lost lock or "
            "a dead host would end without calling, and the request would be dead-lettered without an outcome. "
            "Lower INTEGRATION_MANAGER_IN_FLIGHT_MS or INTEGRATION_MANAGER_RETRY_BUDGET_MS (or the timeouts) by "
            f"{window - limit} ms in all"
        )

    def _claim_lease_problem(self) -> str | None:
        # shared/claim.py: once the lease has run out, a duplicate request takes the claim and calls. The holder
        # starts no call after its retry budget and its last call is over by the end of the calls window
        # (shared/token_refresh.py), so a lease of at least the calls window keeps the calls apart. A holder still
        # running past its lease cannot overwrite the new holder's claim either: every claim write is etag-guarded.
        lease = self.claim_lease_ms
        if lease >= self.calls_window_ms:
            return None
        return (
            f"{_setting_value('TOKEN_REFRESH_CLAIM_LEASE_MS', lease)} is shorter than the "
            f"{self._calls_window_text()}: a claim would run out while its delivery may still be calling, and a "
            "duplicate request would call integration-manager at the same time. Set TOKEN_REFRESH_CLAIM_LEASE_MS to "
            f"at least {self.calls_window_ms}"
        )

    def _rate_limits_problem(self) -> str | None:
        # shared/token_refresh.py _come_back_later: a call whose integration's next call slot is further off than a
        # delivery may wait comes back at the slot as a scheduled copy. With TOKEN_REFRESH_RETRY_DELAY_MS=0 there are
        # no scheduled copies: the queue redelivers at once, again and again, until its delivery limit.
        if not self.rate_limits or self.retry_delay_ms > 0:
            return None
        return (
            "TOKEN_REFRESH_RATE_LIMITS is set while TOKEN_REFRESH_RETRY_DELAY_MS=0 (the queue redelivers at once): a "
            "refresh paced to a call slot further off than a delivery may wait could only be redelivered at once, "
            "until the queue dead-letters it. Set TOKEN_REFRESH_RETRY_DELAY_MS above 0 (scheduled copies), or clear "
            "TOKEN_REFRESH_RATE_LIMITS"
        )

    def _threshold_problem(self) -> str | None:
        # A check requests the tokens expiring within the threshold; the next one comes check_gap_ms later. A token
        # expiring between the two is first requested after it expired. (Less than SAFETY_MARGIN_MS beyond the
        # interval leaves little time to refresh: warn_about_risky_threshold warns, it does not refuse.)
        threshold, interval, gap = self.expiration_threshold_ms, self.interval_ms, self.check_gap_ms
        if threshold >= gap:
            return None
        between = "" if gap == interval else f" (rounded up to the timer's whole minutes: {gap} ms)"
        return (
            f"{_setting_value('TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS', threshold)} is shorter than the time between "
            f"two checks, {_setting_value('TOKEN_REFRESH_INTERVAL_MS', interval)}{between}: a token expiring between "
            "two checks would be requested only after it expired. Set TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS to at "
            f"least {gap} (recommended: {gap + SAFETY_MARGIN_MS} or more), or TOKEN_REFRESH_INTERVAL_MS lower"
        )

    # Derived views -----------------------------------------------------------------------------

    @property
    def calls_window_ms(self) -> int:
        """The latest after claiming a request that a delivery may still be calling, or a call of it still be
        running at integration-manager: its retry budget, the last call's timeouts and the in-flight window."""
        return (
            self.integration_manager_retry_budget_ms
            + self.integration_manager_connect_timeout_ms
            + self.integration_manager_timeout_ms
            + self.integration_manager_in_flight_ms
        )

    @property
    def check_gap_ms(self) -> int:
        """The longest time between two checks: TOKEN_REFRESH_INTERVAL_MS rounded up to the timer's whole minutes."""
        return max(TIMER_TICK_MS, math.ceil(self.interval_ms / TIMER_TICK_MS) * TIMER_TICK_MS)

    @property
    def service_bus_configured(self) -> bool:
        """Service Bus is set up, by connection string or by namespace (managed identity)."""
        return bool(self.service_bus_connection_string or self.service_bus_namespace)

    @property
    def rabbitmq_configured(self) -> bool:
        """Events are bridged to the platform's RabbitMQ (RABBITMQ_URL is set)."""
        return self.rabbitmq_url is not None

    @property
    def scheduling(self) -> bool:
        """The check schedules refresh requests (a rate limit or a spread is set); otherwise each is due at once."""
        return bool(self.rate_limits) or self.spread_ms > 0

    def threshold_is_risky(self) -> bool:
        """True when tokens could expire between two checks (threshold < interval + safety margin)."""
        return self.expiration_threshold_ms < self.interval_ms + SAFETY_MARGIN_MS


# TOKEN_REFRESH_RATE_LIMITS ----------------------------------------------------------------------------

RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
MAX_RATE_PER_S = 10_000.0
DEFAULT_RATE_KEY = "*"


def parse_rate_limits(text: str) -> dict[str, float]:
    """`salesforce=5/s,hubspot=120/min,*=50/s` as requests per second by integration id (`*`: every other
    integration). Raises ValueError naming the entry that does not fit (settings errors add the expected form)."""
    limits: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, equals, rate = (piece.strip() for piece in entry.partition("="))
        number, slash, unit = (piece.strip() for piece in rate.partition("/"))
        if not equals or not name:
            raise ValueError(f"entry {entry!r} is not integrationId=rate")
        if not slash or unit.lower() not in RATE_UNITS:
            raise ValueError(f"entry {entry!r} has no unit /s, /min or /h")
        try:
            per_unit = float(number)
        except ValueError:
            raise ValueError(f"entry {entry!r}: {number!r} is not a number") from None
        per_second = per_unit / RATE_UNITS[unit.lower()]
        if not 0 < per_second <= MAX_RATE_PER_S:  # also refuses nan and inf
            raise ValueError(f"entry {entry!r}: the rate must be above 0 and at most {MAX_RATE_PER_S:g}/s")
        if name in limits:
            raise ValueError(f"integration {name!r} is listed twice")
        limits[name] = per_second
    return limits


def rate_limit(settings: Settings, integration_id: str) -> float | None:
    """Requests per second allowed for `integration_id` (its own entry, else `*`); None: no limit."""
    limits = settings.rate_limits
    return limits.get(integration_id, limits.get(DEFAULT_RATE_KEY))


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read and validate settings from `environ` (default: the process environment)."""
    try:
        if environ is None:
            return Settings()
        known = {name: environ[name] for name in setting_fields() if name in environ}
        return Settings.model_validate(known)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


# Expected forms --------------------------------------------------------------------------------------
# What a SettingsError says a setting should look like is derived from its field: the type, the ge/le
# bounds, and from json_schema_extra "unit" (what a number counts; a `…_MS` setting counts milliseconds)
# and "zero" (what 0 means). Only where the type cannot say it (URLs, connection strings, names, secrets)
# does json_schema_extra "expected" give the whole text. docs/settings.md's table is generated from the
# same fields (`python -m localdev.settings_doc`).

_DURATION_UNITS = (("year", 365 * DAY_MS), ("day", DAY_MS), ("hour", 3_600_000), ("minute", 60_000))


def setting_fields() -> dict[str, Any]:
    """Each setting's name (the field alias) and its pydantic `FieldInfo`, in the model's order."""
    return {field.alias: field for field in Settings.model_fields.values() if field.alias}


def _extra(field: Any) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _bound(field: Any, name: str) -> int | None:
    return next((getattr(item, name) for item in field.metadata if hasattr(item, name)), None)


def human_duration(ms: int) -> str | None:
    """`ms` in the largest unit of a minute or more that divides it (604800000 → "7 days"); None below a minute."""
    for unit, size in _DURATION_UNITS:
        if ms >= size and ms % size == 0:
            count = ms // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return None


def value_note(setting: str, value: int) -> str | None:
    """What a number means beyond itself: "off" for a 0 that switches a feature off, "7 days" for 604800000 ms."""
    field = setting_fields()[setting]
    if value == 0 and (zero := _extra(field).get("zero")):
        return zero
    return human_duration(value) if setting.endswith("_MS") else None


def _with_note(setting: str, value: int) -> str:
    note = value_note(setting, value)
    return f"{value} ({note})" if note else str(value)


def _setting_value(setting: str, value: int) -> str:
    """`SETTING=value (note)`, as a message about settings that contradict each other names each of them."""
    return f"{setting}={_with_note(setting, value)}"


def expected_form(setting: str) -> str:
    """The form a setting's value must have, as SettingsError messages and docs/settings.md state it."""
    field = setting_fields().get(setting)
    if field is None:
        return "see docs/settings.md"
    if expected := _extra(field).get("expected"):
        return expected
    if field.annotation is bool:
        return "true or false"
    if field.annotation is int:
        unit = "milliseconds" if setting.endswith("_MS") else _extra(field).get("unit")
        form = f"a whole number of {unit}" if unit else "a whole number"
        low, high = _bound(field, "ge"), _bound(field, "le")
        if low is not None:
            form += f" from {_with_note(setting, low)}"
        if high is not None:
            form += f" to {_with_note(setting, high)}" if low is not None else f" up to {_with_note(setting, high)}"
        return form
    return "see docs/settings.md"


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        setting = str(item["loc"][0]) if item["loc"] else ""
        reason = item["msg"].removeprefix("Value error, ")
        if not setting:
            problems.append(reason)
            continue
        problems.append(f"{setting}: {reason}; expected {expected_form(setting)}")
    return "Invalid application settings: " + " | ".join(problems)


def warn_about_risky_threshold(settings: Settings) -> None:
    """Log once (at start-up) when tokens could expire between two checks; never refuses the settings."""
    if settings.threshold_is_risky():
        logger.warning(
            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS (%d) is shorter than TOKEN_REFRESH_INTERVAL_MS (%d) "
            "plus a %d ms safety margin: a token can expire between two checks. "
            "Set the threshold to at least %d.",
            settings.expiration_threshold_ms,
            settings.interval_ms,
            SAFETY_MARGIN_MS,
            settings.interval_ms + SAFETY_MARGIN_MS,
        )


def unknown_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that look like this app's settings (SETTING_PREFIXES, any case) but are none,
    each with the known setting its name is closest to."""
    known = list(setting_fields())
    by_upper = {name.upper(): name for name in known}
    unknown = {}
    for name in sorted(environ):
        if name in known or name in DEPLOY_VARIABLES or not name.upper().startswith(SETTING_PREFIXES):
            continue
        [closest] = difflib.get_close_matches(name.upper(), list(by_upper), n=1, cutoff=0)
        unknown[name] = by_upper[closest]
    return unknown


def warn_about_unknown_settings(environ: Mapping[str, str] | None = None) -> None:
    """Log once (at start-up) each variable that looks like a misspelt setting, with the closest known name: the
    app ignores it, so the setting it was meant for keeps its default. Names only: a value may be a secret."""
    for name, closest in unknown_settings(os.environ if environ is None else environ).items():
        logger.warning(
            "%s is not a setting of this app and is ignored; did you mean %s? (every setting: docs/settings.md)",
            name,
            closest,
        )
