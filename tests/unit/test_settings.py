"""Settings: defaults, every bad value fails fast naming the setting, secrets never echoed."""

import json
import logging
import re
from pathlib import Path

import pytest

from shared import settings as settings_module
from shared.errors import SettingsError
from shared.settings import (
    DEFAULT_SKIP_STATUSES,
    load_settings,
    rate_limit,
    warn_about_risky_threshold,
    warn_about_unknown_settings,
)

APP_ROOT = Path(__file__).resolve().parents[2]

SECRET = "s3cr3t-value-that-must-not-leak"


def test_defaults_follow_the_design_contract():
    settings = load_settings({})
    assert settings.enabled is True
    assert settings.interval_ms == 3_600_000
    assert settings.expiration_threshold_ms == 4_200_000  # the interval + 10 min (docs/settings.md#defaults)
    assert settings.cosmos_database == "integrations"
    assert settings.cosmos_connections_container == "integration_connections"
    assert settings.rabbitmq_exchange == "integration.events"
    assert settings.skip_statuses == DEFAULT_SKIP_STATUSES
    assert not settings.service_bus_configured
    assert not settings.rabbitmq_configured


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("FALSE", False), ("0", False), ("1", True), ("", True)],
)
def test_enabled_switch_accepts_usual_boolean_spellings(value, expected):
    assert load_settings({"TOKEN_REFRESH_ENABLED": value}).enabled is expected


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("TOKEN_REFRESH_ENABLED", "maybe"),
        ("TOKEN_REFRESH_INTERVAL_MS", "abc"),
        ("TOKEN_REFRESH_INTERVAL_MS", "1h"),
        ("TOKEN_REFRESH_INTERVAL_MS", "-5"),
        ("TOKEN_REFRESH_INTERVAL_MS", "999"),
        ("TOKEN_REFRESH_INTERVAL_MS", "1.5"),
        ("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "-1"),
        ("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS", "soon"),
        ("TOKEN_REFRESH_PAGE_SIZE", "0"),
        ("TOKEN_REFRESH_PAGE_SIZE", "5000"),
        ("COSMOS_ENDPOINT", "http://insecure.example.com"),
        ("COSMOS_ENDPOINT", "not a url"),
        ("RABBITMQ_URL", "http://guest:guest@localhost:5672"),
        ("INTEGRATION_MANAGER_URL", "ftp://manager"),
        ("INTEGRATION_MANAGER_URL", "https://manager/api?x=1"),
        ("INTEGRATION_MANAGER_URL", "https://manager/#frag"),
        ("INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS", "0"),
        ("INTEGRATION_MANAGER_TIMEOUT_MS", "forever"),
        ("ServiceBusConnection", "Endpoint=https://nope/;SharedAccessKey=x"),
        ("ServiceBusConnection__fullyQualifiedNamespace", "sb://ns.servicebus.windows.net/"),
    ],
)
def test_bad_value_names_the_setting_and_expected_form(setting, value):
    with pytest.raises(SettingsError) as raised:
        load_settings({setting: value})
    message = str(raised.value)
    assert setting in message
    assert "expected" in message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("RABBITMQ_URL", f"http://user:{SECRET}@localhost"),
        ("INTEGRATION_MANAGER_URL", f"https://user:{SECRET}@manager.example.com"),
        ("ServiceBusConnection", f"Endpoint=https://ns/;SharedAccessKey={SECRET}"),
    ],
)
def test_errors_never_echo_secret_values(setting, value):
    with pytest.raises(SettingsError) as raised:
        load_settings({setting: value})
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value)


SECRET_SETTINGS = [  # each secret setting, with {} where the secret goes in its value
    ("INTEGRATION_MANAGER_TOKEN", "{}"),
    ("COSMOS_KEY", "{}"),
    ("RABBITMQ_URL", "amqp://app:{}@rabbit.example.com:5672/"),
    ("ServiceBusConnection", "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={}"),
]
UNSAFE_CHARACTERS = [
    ("\n", "a line break (U+000A)"),
    ("\r", "a line break (U+000D)"),
    (" ", "a space (U+0020)"),
    ("\t", "a tab (U+0009)"),
    ("\x00", "a control character (U+0000)"),
    ("\x1b", "a control character (U+001B)"),
    ("\u00a0", "a whitespace character (U+00A0)"),
    ("\u200b", "an invisible character (U+200B)"),
]


@pytest.mark.parametrize(("setting", "template"), SECRET_SETTINGS)
@pytest.mark.parametrize(("char", "described"), UNSAFE_CHARACTERS)
def test_whitespace_or_a_control_character_inside_a_secret_is_refused_saying_where_not_what(
    setting, template, char, described
):
    head, tail = SECRET[:10], SECRET[10:]
    with pytest.raises(SettingsError) as raised:
        load_settings({setting: template.format(head + char + tail)})
    message = str(raised.value)
    position = template.index("{}") + len(head) + 1
    assert f"{setting}: contains {described} at character {position}" in message
    for text in (message, repr(raised.value)):
        assert head not in text and tail not in text


@pytest.mark.parametrize(("setting", "template"), SECRET_SETTINGS)
def test_whitespace_around_a_secret_is_trimmed(setting, template):
    value = template.format(SECRET)
    assert load_settings({setting: f" \t{value}\n "}) == load_settings({setting: value})


def test_service_bus_connection_string_and_namespace_together_are_explained():
    with pytest.raises(SettingsError, match="Set only one"):
        load_settings(
            {
                "ServiceBusConnection": "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
                "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
            }
        )


def test_secrets_are_hidden_in_repr():
    settings = load_settings(
        {"COSMOS_KEY": SECRET, "INTEGRATION_MANAGER_TOKEN": SECRET, "RABBITMQ_URL": f"amqp://u:{SECRET}@h/"}
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_skip_statuses_are_a_comma_separated_case_insensitive_list():
    assert load_settings({"TOKEN_REFRESH_SKIP_STATUSES": " Revoked, PAUSED ,, "}).skip_statuses == ("revoked", "paused")


def test_manager_url_trailing_slash_is_dropped_and_path_prefix_kept():
    assert load_settings({"INTEGRATION_MANAGER_URL": "https://m.example.com/im/"}).integration_manager_url == (
        "https://m.example.com/im"
    )


def test_blank_values_mean_default():
    assert load_settings({"TOKEN_REFRESH_INTERVAL_MS": "  ", "RABBITMQ_EXCHANGE": ""}).interval_ms == 3_600_000


def test_warns_when_tokens_could_expire_between_checks(caplog):
    with caplog.at_level(logging.WARNING):
        warn_about_risky_threshold(
            load_settings({"TOKEN_REFRESH_INTERVAL_MS": "3600000", "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3600000"})
        )
    assert "can expire between two checks" in caplog.text


def test_no_warning_when_threshold_covers_interval_and_margin(caplog):
    with caplog.at_level(logging.WARNING):
        warn_about_risky_threshold(
            load_settings({"TOKEN_REFRESH_INTERVAL_MS": "3600000", "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3900000"})
        )
    assert caplog.text == ""


def test_rate_limits_are_per_integration_with_a_default_and_units():
    settings = load_settings({"TOKEN_REFRESH_RATE_LIMITS": " salesforce=5/s, hubspot=120/min, xero=36/h, *=50/s "})
    assert settings.rate_limits == {"salesforce": 5.0, "hubspot": 2.0, "xero": 0.01, "*": 50.0}
    assert (rate_limit(settings, "salesforce"), rate_limit(settings, "google")) == (5.0, 50.0)
    assert settings.scheduling
    without_default = load_settings({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=5/s"})
    assert rate_limit(without_default, "google") is None


def test_no_limit_and_no_spread_by_default_keep_every_request_due_at_once():
    settings = load_settings({})
    assert (settings.rate_limits, settings.spread_ms, settings.scheduling) == ({}, 0, False)
    assert load_settings({"TOKEN_REFRESH_SPREAD_MS": "60000"}).scheduling


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("salesforce=5", "entry 'salesforce=5' has no unit /s, /min or /h"),
        ("salesforce", "entry 'salesforce' is not integrationId=rate"),
        ("=5/s", "entry '=5/s' is not integrationId=rate"),
        ("salesforce=five/s", "'five' is not a number"),
        ("salesforce=0/s", "the rate must be above 0"),
        ("salesforce=-1/s", "the rate must be above 0"),
        ("salesforce=nan/s", "the rate must be above 0"),
        ("salesforce=20000/s", "at most 10000/s"),
        ("salesforce=5/day", "has no unit"),
        ("salesforce=5/s,salesforce=6/s", "integration 'salesforce' is listed twice"),
    ],
)
def test_a_bad_rate_limit_names_the_entry_and_the_expected_form(value, problem):
    with pytest.raises(SettingsError) as error:
        load_settings({"TOKEN_REFRESH_RATE_LIMITS": value})
    text = str(error.value)
    assert text.startswith("Invalid application settings: TOKEN_REFRESH_RATE_LIMITS: ")
    assert problem in text
    assert "expected a comma-separated list of integrationId=N/s" in text


@pytest.mark.parametrize("value", ["-1", "86400001", "soon"])
def test_a_bad_spread_names_the_setting(value):
    with pytest.raises(SettingsError, match=r"TOKEN_REFRESH_SPREAD_MS: .*expected a whole number of milliseconds"):
        load_settings({"TOKEN_REFRESH_SPREAD_MS": value})


# Settings that must agree (docs/settings.md#settings-that-must-agree) -------------------------------------------


def refused(values: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as raised:
        load_settings(values)
    return str(raised.value)


def test_the_defaults_do_not_trip_the_apps_own_risky_threshold_warning(caplog):
    with caplog.at_level(logging.WARNING):
        warn_about_risky_threshold(load_settings({}))
    assert caplog.text == ""
    settings = load_settings({})
    # Comfortably above: the interval + the safety margin + a check's time budget + one timer tick.
    assert settings.expiration_threshold_ms >= (
        settings.interval_ms + settings_module.SAFETY_MARGIN_MS + settings.check_time_budget_ms + 60_000
    )


def test_the_runbooks_interval_and_threshold_still_load_with_the_warning(caplog):
    runbook = {"TOKEN_REFRESH_INTERVAL_MS": "3600000", "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3600000"}
    with caplog.at_level(logging.WARNING):
        warn_about_risky_threshold(load_settings(runbook))
    assert "can expire between two checks" in caplog.text


def test_local_settings_example_values_load_without_a_warning(caplog):
    values = json.loads((APP_ROOT / "local.settings.json.example").read_text(encoding="utf-8"))["Values"]
    with caplog.at_level(logging.WARNING):
        warn_about_risky_threshold(load_settings(values))
        warn_about_unknown_settings(values)
    assert caplog.text == ""


def test_local_settings_example_lists_every_setting_with_its_default_and_service_bus_by_identity():
    """What `cp local.settings.json.example local.settings.json` starts from (docs/running-locally.md): every
    setting, each one the model has a default for at that default; Service Bus in the identity-based form, the only
    one the namespace scripts/deploy.sh creates accepts (it disables keys; both forms at once are refused)."""
    values = json.loads((APP_ROOT / "local.settings.json.example").read_text(encoding="utf-8"))["Values"]
    defaults = load_settings({})
    for setting, field in settings_module.setting_fields().items():
        if setting == "ServiceBusConnection":
            assert setting not in values
            continue
        assert setting in values, f"{setting} is missing from local.settings.json.example"
        if field.default is not None:
            field_name = next(name for name, f in settings_module.Settings.model_fields.items() if f is field)
            loaded = getattr(load_settings({setting: values[setting]}), field_name)
            assert loaded == getattr(defaults, field_name), f"{setting}={values[setting]!r} is not its default"
    assert values["ServiceBusConnection__fullyQualifiedNamespace"].endswith(".servicebus.windows.net")


# Misspelt settings (issue #23) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("TOKEN_REFRESH_RATE_LIMIT", "TOKEN_REFRESH_RATE_LIMITS"),
        ("TOKEN_REFRESH_INTERVAL", "TOKEN_REFRESH_INTERVAL_MS"),
        ("token_refresh_page_size", "TOKEN_REFRESH_PAGE_SIZE"),  # settings are case-sensitive: ignored too
        ("INTEGRATION_MANAGER_TOKEN_", "INTEGRATION_MANAGER_TOKEN"),
        ("COSMOS_ENDPIONT", "COSMOS_ENDPOINT"),
        ("RABBITMQ_URI", "RABBITMQ_URL"),
    ],
)
def test_a_misspelt_setting_is_warned_about_with_the_name_it_was_meant_to_be_never_its_value(variable, meant, caplog):
    with caplog.at_level(logging.WARNING):
        warn_about_unknown_settings({variable: SECRET, "TOKEN_REFRESH_ENABLED": "true"})
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"{variable} is not a setting of this app and is ignored; did you mean {meant}?"
    )
    assert SECRET not in caplog.text


def test_settings_variables_of_other_prefixes_and_the_deploy_scripts_inputs_are_not_warned_about(caplog):
    environ = {name: "x" for name in settings_module.setting_fields()}
    environ |= {"PATH": "/usr/bin", "AzureWebJobsStorage": "x", "COSMOS_ACCOUNT": "acct", "COSMOS_RESOURCE_GROUP": "rg"}
    with caplog.at_level(logging.WARNING):
        warn_about_unknown_settings(environ)
    assert caplog.text == ""


def test_a_misspelt_setting_is_warned_about_once_when_the_process_loads_its_settings(monkeypatch, caplog):
    from shared import runtime

    monkeypatch.setenv("TOKEN_REFRESH_RATE_LIMIT", "salesforce=5/s")
    runtime.reset()
    try:
        with caplog.at_level(logging.WARNING):
            assert runtime.settings().rate_limits == {}  # ignored: the setting keeps its default
            runtime.settings()
    finally:
        runtime.reset()
    assert caplog.text.count("TOKEN_REFRESH_RATE_LIMIT is not a setting") == 1
    assert "did you mean TOKEN_REFRESH_RATE_LIMITS?" in caplog.text


def test_in_flight_longer_than_the_retry_budget_is_refused_when_retries_are_redeliveries():
    """Issue #22 item 4: the redelivery comes at once, finds the in-flight window longer than it may wait, and ends
    without calling: 10 deliveries within milliseconds, 1 call, 0 events."""
    refused_naming(
        {
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "120000",
            "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "60000",
            "TOKEN_REFRESH_RETRY_DELAY_MS": "0",
        },
        "INTEGRATION_MANAGER_IN_FLIGHT_MS=120000",
        "INTEGRATION_MANAGER_RETRY_BUDGET_MS=60000",
        "TOKEN_REFRESH_RETRY_DELAY_MS=0",
        "INTEGRATION_MANAGER_IN_FLIGHT_MS to at most 60000",
    )


def refused_naming(values: dict, *named: str) -> None:
    """The settings are refused in one message that names each of `named`."""
    message = refused(values)
    assert message.count("Invalid application settings") == 1
    for text in named:
        assert text in message, message


@pytest.mark.parametrize(
    "values",
    [
        # Scheduled retries come back after the in-flight window: every copy can call.
        {"INTEGRATION_MANAGER_IN_FLIGHT_MS": "120000", "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "60000"},
        # A redelivery that comes at once waits the whole window out within its budget.
        {
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "60000",
            "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "60000",
            "TOKEN_REFRESH_RETRY_DELAY_MS": "0",
        },
        {
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "0",
            "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "1000",
            "TOKEN_REFRESH_RETRY_DELAY_MS": "0",
        },
    ],
)
def test_in_flight_within_the_budget_or_with_scheduled_retries_is_accepted(values):
    load_settings(values)


def test_rate_limits_without_scheduled_copies_are_refused():
    """Issue #22, found by the simulation (F7): a paced request whose call slot is far off was redelivered at once on
    every delivery and dead-lettered without an outcome."""
    message = refused({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=2/s", "TOKEN_REFRESH_RETRY_DELAY_MS": "0"})
    assert "TOKEN_REFRESH_RATE_LIMITS" in message and "TOKEN_REFRESH_RETRY_DELAY_MS=0" in message
    load_settings({"TOKEN_REFRESH_RATE_LIMITS": "salesforce=2/s", "TOKEN_REFRESH_RETRY_DELAY_MS": "50"})
    load_settings({"TOKEN_REFRESH_RETRY_DELAY_MS": "0"})


def test_the_calls_window_is_the_retry_budget_the_timeouts_and_the_in_flight_window():
    assert load_settings({}).calls_window_ms == 60_000 + 5_000 + 30_000 + 60_000
    settings = load_settings(
        {
            "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "5000",
            "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "1000",
            "INTEGRATION_MANAGER_TIMEOUT_MS": "2000",
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "3000",
        }
    )
    assert settings.calls_window_ms == 11_000


def test_a_calls_window_longer_than_the_lock_renewal_is_refused():
    """Issue #22 item 4 (the same shape): a redelivery after a lost lock waits at most the lock renewal for the
    earlier delivery's calls, and ends without calling while they may still run."""
    refused_naming(
        {
            "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "300000",
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "60000",
            "TOKEN_REFRESH_CLAIM_LEASE_MS": "3600000",
        },
        "INTEGRATION_MANAGER_RETRY_BUDGET_MS=300000",
        "INTEGRATION_MANAGER_IN_FLIGHT_MS=60000",
        "INTEGRATION_MANAGER_TIMEOUT_MS=30000",
        "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS=5000",
        "= 395000 ms",
        "maxAutoLockRenewalDuration",
        "300000",
    )


@pytest.mark.parametrize("lease", ["1000", "60000", "154999"])
def test_a_claim_lease_shorter_than_the_calls_window_is_refused(lease):
    """Issue #22 item 10: with a 1 s lease a 3 s call and a duplicate request made 2 concurrent calls."""
    message = refused({"TOKEN_REFRESH_CLAIM_LEASE_MS": lease})
    assert f"TOKEN_REFRESH_CLAIM_LEASE_MS={lease}" in message
    assert "INTEGRATION_MANAGER_IN_FLIGHT_MS=60000" in message and "= 155000 ms" in message
    assert "TOKEN_REFRESH_CLAIM_LEASE_MS to at least 155000" in message


def test_a_claim_lease_as_long_as_the_calls_window_is_accepted():
    # No call starts after the retry budget and claim writes are etag-guarded: the calls window is what the lease
    # must cover, not the function timeout (short leases keep the local host's crash tests quick).
    settings = load_settings(
        {"TOKEN_REFRESH_CLAIM_LEASE_MS": "8500", "INTEGRATION_MANAGER_RETRY_BUDGET_MS": "5000"}
        | {"INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS": "500", "INTEGRATION_MANAGER_TIMEOUT_MS": "1000"}
        | {"INTEGRATION_MANAGER_IN_FLIGHT_MS": "2000"}
    )
    assert settings.claim_lease_ms == settings.calls_window_ms == 8500


@pytest.mark.parametrize(
    ("interval", "threshold", "at_least"),
    [
        ("3600000", "60000", 3_600_000),
        ("3600000", "3599999", 3_600_000),
        ("3600000", "0", 3_600_000),
        ("90000", "100000", 120_000),  # the timer ticks on whole minutes: a check every 2 minutes
        ("5000", "30000", 60_000),
    ],
)
def test_a_threshold_shorter_than_the_time_between_two_checks_is_refused(interval, threshold, at_least):
    message = refused({"TOKEN_REFRESH_INTERVAL_MS": interval, "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": threshold})
    assert f"TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS={threshold}" in message
    assert f"TOKEN_REFRESH_INTERVAL_MS={interval}" in message
    assert f"TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS to at least {at_least}" in message


@pytest.mark.parametrize(
    ("interval", "threshold"), [("3600000", "3600000"), ("90000", "120000"), ("5000", "90000"), ("60000", "3900000")]
)
def test_a_threshold_that_reaches_every_token_before_it_expires_is_accepted(interval, threshold):
    load_settings({"TOKEN_REFRESH_INTERVAL_MS": interval, "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": threshold})


def test_every_contradiction_is_reported_in_one_message():
    message = refused(
        {
            "INTEGRATION_MANAGER_IN_FLIGHT_MS": "120000",
            "TOKEN_REFRESH_RETRY_DELAY_MS": "0",
            "TOKEN_REFRESH_CLAIM_LEASE_MS": "1000",
            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "60000",
        }
    )
    assert message.startswith("Invalid application settings: ")
    assert message.count(" | ") == 2, message
    assert "INTEGRATION_MANAGER_IN_FLIGHT_MS=120000" in message
    assert "TOKEN_REFRESH_CLAIM_LEASE_MS=1000" in message
    assert "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS=60000" in message


def host_json_duration_ms(text: str) -> int:
    hours, minutes, seconds = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", text).groups()
    return int((int(hours) * 3600 + int(minutes) * 60 + float(seconds)) * 1000)


def test_the_host_json_limits_the_settings_must_fit_are_the_ones_in_host_json():
    host = json.loads((APP_ROOT / "host.json").read_text(encoding="utf-8"))
    function_timeout = host_json_duration_ms(host["functionTimeout"])
    lock_renewal = host_json_duration_ms(host["extensions"]["serviceBus"]["maxAutoLockRenewalDuration"])
    assert (function_timeout, lock_renewal) == (settings_module.FUNCTION_TIMEOUT_MS, settings_module.LOCK_RENEWAL_MS)
