"""Application settings: the one place that reads and validates configuration.

Azure Functions exposes application settings as environment variables; `func start` and the local
CLI load `local.settings.json` `Values` into the environment first. A bad value fails fast with a
`SettingsError` that names the setting and the expected form, never the (possibly secret) value.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.secrets import unsafe_character

logger = logging.getLogger(__name__)

# Time a refresh needs between being selected and the token expiring: queueing, the refresh call,
# provider latency. A threshold shorter than interval + this margin can let tokens expire between checks.
SAFETY_MARGIN_MS = 5 * 60 * 1000

DAY_MS = 86_400_000
DEFAULT_SKIP_STATUSES = ("revoked", "disabled", "deleted")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class SettingsError(ValueError):
    """A setting is missing or malformed. The message names the setting and the expected form."""


def _expected_form(setting: str) -> str:
    return _EXPECTED_FORMS.get(setting, "see docs/settings.md")


_EXPECTED_FORMS = {
    "TOKEN_REFRESH_ENABLED": "true or false",
    "TOKEN_REFRESH_INTERVAL_MS": "a whole number of milliseconds from 1000 to 604800000 (7 days), e.g. 3600000",
    "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "a whole number of milliseconds from 0 to 31536000000 (365 days), "
    "e.g. 3900000",
    "TOKEN_REFRESH_SKIP_STATUSES": "a comma-separated list of connection statuses, e.g. revoked,disabled,deleted",
    "TOKEN_REFRESH_PAGE_SIZE": "a whole number between 1 and 1000",
    "TOKEN_REFRESH_CHECK_TIME_BUDGET_MS": "a whole number of milliseconds between 1 and 3600000",
    "COSMOS_ENDPOINT": "an https:// URL such as https://myaccount.documents.azure.com:443/",
    "COSMOS_DATABASE": "a non-empty database name",
    "COSMOS_CONNECTIONS_CONTAINER": "a non-empty container name",
    "ServiceBusConnection": "a Service Bus connection string: Endpoint=sb://<namespace>.servicebus.windows.net/;"
    "SharedAccessKeyName=...;SharedAccessKey=...",
    "ServiceBusConnection__fullyQualifiedNamespace": "a host name such as mynamespace.servicebus.windows.net",
    "RABBITMQ_URL": "an amqp:// or amqps:// URL",
    "RABBITMQ_EXCHANGE": "a non-empty exchange name",
    "INTEGRATION_MANAGER_URL": "an http:// or https:// base URL without query, fragment or credentials",
    "INTEGRATION_MANAGER_TOKEN": "the bearer token integration-manager accepts, on one line, without spaces",
    "COSMOS_KEY": "the account's primary or secondary key (base64), without spaces; or unset for managed identity",
    "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "a whole number of milliseconds between 100 and 60000",
    "INTEGRATION_MANAGER_TIMEOUT_MS": "a whole number of milliseconds between 100 and 600000",
    "INTEGRATION_MANAGER_MAX_ATTEMPTS": "a whole number of calls per delivery between 1 and 10",
    "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "a whole number of milliseconds between 0 and 300000",
    "INTEGRATION_MANAGER_BACKOFF_INITIAL_MS": "a whole number of milliseconds between 1 and 60000",
    "INTEGRATION_MANAGER_IN_FLIGHT_MS": "a whole number of milliseconds between 0 and 600000",
    "TOKEN_REFRESH_MAX_DELIVERY_COUNT": "the refresh queue's MaxDeliveryCount, a whole number between 1 and 100",
    "TOKEN_REFRESH_RETRY_DELAY_MS": "a whole number of milliseconds from 0 (redeliver at once) to 3600000 (1 hour)",
    "TOKEN_REFRESH_FAILURE_COOLDOWN_MS": "a whole number of milliseconds from 0 (off) to 31536000000 (365 days)",
    "TOKEN_REFRESH_CLAIM_LEASE_MS": "a whole number of milliseconds from 1000 to 86400000 (1 day)",
    "TOKEN_REFRESH_MAX_AGE_MS": "a whole number of milliseconds from 0 (off) to 315360000000 (10 years)",
    "TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD": "a whole number of connections between 1 and 200",
    "TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS": "a whole number of milliseconds from 60000 to 86400000 (1 day)",
    "COSMOS_STATE_CONTAINER": "a non-empty container name",
    "COSMOS_EMULATOR": "true or false",
}


class Settings(BaseSettings):
    """Every setting the app reads. Field aliases are the application-setting names."""

    model_config = SettingsConfigDict(case_sensitive=True, populate_by_name=True, extra="ignore")

    enabled: bool = Field(True, alias="TOKEN_REFRESH_ENABLED")
    interval_ms: int = Field(3_600_000, alias="TOKEN_REFRESH_INTERVAL_MS", ge=1000, le=7 * DAY_MS)
    expiration_threshold_ms: int = Field(
        3_600_000, alias="TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", ge=0, le=365 * DAY_MS
    )
    skip_statuses: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_SKIP_STATUSES, alias="TOKEN_REFRESH_SKIP_STATUSES"
    )
    page_size: int = Field(200, alias="TOKEN_REFRESH_PAGE_SIZE", ge=1, le=1000)
    check_time_budget_ms: int = Field(240_000, alias="TOKEN_REFRESH_CHECK_TIME_BUDGET_MS", ge=1, le=3_600_000)

    cosmos_endpoint: str | None = Field(None, alias="COSMOS_ENDPOINT")
    cosmos_key: SecretStr | None = Field(None, alias="COSMOS_KEY")
    cosmos_database: str = Field("integrations", alias="COSMOS_DATABASE", min_length=1)
    cosmos_connections_container: str = Field(
        "integration_connections", alias="COSMOS_CONNECTIONS_CONTAINER", min_length=1
    )

    service_bus_connection_string: SecretStr | None = Field(None, alias="ServiceBusConnection")
    service_bus_namespace: str | None = Field(None, alias="ServiceBusConnection__fullyQualifiedNamespace")

    rabbitmq_url: SecretStr | None = Field(None, alias="RABBITMQ_URL")
    rabbitmq_exchange: str = Field("integration.events", alias="RABBITMQ_EXCHANGE", min_length=1)

    integration_manager_url: str | None = Field(None, alias="INTEGRATION_MANAGER_URL")
    integration_manager_token: SecretStr | None = Field(None, alias="INTEGRATION_MANAGER_TOKEN")
    integration_manager_connect_timeout_ms: int = Field(
        5_000, alias="INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS", ge=100, le=60_000
    )
    integration_manager_timeout_ms: int = Field(30_000, alias="INTEGRATION_MANAGER_TIMEOUT_MS", ge=100, le=600_000)
    integration_manager_max_attempts: int = Field(3, alias="INTEGRATION_MANAGER_MAX_ATTEMPTS", ge=1, le=10)
    integration_manager_backoff_initial_ms: int = Field(
        500, alias="INTEGRATION_MANAGER_BACKOFF_INITIAL_MS", ge=1, le=60_000
    )
    integration_manager_retry_budget_ms: int = Field(
        60_000, alias="INTEGRATION_MANAGER_RETRY_BUDGET_MS", ge=0, le=300_000
    )
    # How long integration-manager may go on working on a call the app stopped waiting for (a read
    # timeout, a connection dropped after sending, a gateway's 502/504): no new call for that request
    # starts before it has passed (docs/failure-handling.md).
    integration_manager_in_flight_ms: int = Field(60_000, alias="INTEGRATION_MANAGER_IN_FLIGHT_MS", ge=0, le=600_000)

    # Failure handling (docs/failure-handling.md)
    max_delivery_count: int = Field(10, alias="TOKEN_REFRESH_MAX_DELIVERY_COUNT", ge=1, le=100)
    # A transient failure is retried by a scheduled copy of the request, this long after the first
    # failed delivery, doubling per retry up to RETRY_DELAY_MAX_MS: a short outage cannot use up the
    # deliveries. 0: the queue redelivers at once.
    retry_delay_ms: int = Field(30_000, alias="TOKEN_REFRESH_RETRY_DELAY_MS", ge=0, le=3_600_000)
    failure_cooldown_ms: int = Field(DAY_MS, alias="TOKEN_REFRESH_FAILURE_COOLDOWN_MS", ge=0, le=365 * DAY_MS)
    claim_lease_ms: int = Field(600_000, alias="TOKEN_REFRESH_CLAIM_LEASE_MS", ge=1000, le=DAY_MS)
    max_age_ms: int = Field(0, alias="TOKEN_REFRESH_MAX_AGE_MS", ge=0, le=3650 * DAY_MS)
    # Systemic failures (docs/failure-handling.md): this many different connections failing the same way
    # (not about themselves) within the window raise one alarm.
    systemic_failure_threshold: int = Field(5, alias="TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD", ge=1, le=200)
    systemic_failure_window_ms: int = Field(
        900_000, alias="TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS", ge=60_000, le=DAY_MS
    )
    cosmos_state_container: str = Field("token_refresh_state", alias="COSMOS_STATE_CONTAINER", min_length=1)
    cosmos_emulator: bool = Field(False, alias="COSMOS_EMULATOR")

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

    # Derived views -----------------------------------------------------------------------------

    @property
    def service_bus_configured(self) -> bool:
        return bool(self.service_bus_connection_string or self.service_bus_namespace)

    @property
    def rabbitmq_configured(self) -> bool:
        return self.rabbitmq_url is not None

    def threshold_is_risky(self) -> bool:
        """True when tokens could expire between two checks (threshold < interval + safety margin)."""
        return self.expiration_threshold_ms < self.interval_ms + SAFETY_MARGIN_MS


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read and validate settings from `environ` (default: the process environment)."""
    try:
        if environ is None:
            return Settings()
        known = {name: environ[name] for name in _setting_names() if name in environ}
        return Settings.model_validate(known)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def _setting_names() -> list[str]:
    return [field.alias for field in Settings.model_fields.values() if field.alias]


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        setting = str(item["loc"][0]) if item["loc"] else ""
        reason = item["msg"].removeprefix("Value error, ")
        if not setting:
            problems.append(reason)
            continue
        problems.append(f"{setting}: {reason}; expected {_expected_form(setting)}")
    return "Invalid application settings: " + " | ".join(problems)


def warn_about_risky_threshold(settings: Settings) -> None:
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
