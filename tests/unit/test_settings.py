"""Settings: defaults, every bad value fails fast naming the setting, secrets never echoed."""

import logging

import pytest

from shared.errors import SettingsError
from shared.settings import DEFAULT_SKIP_STATUSES, load_settings, rate_limit, warn_about_risky_threshold

SECRET = "s3cr3t-value-that-must-not-leak"


def test_defaults_follow_the_design_contract():
    settings = load_settings({})
    assert settings.enabled is True
    assert settings.interval_ms == 3_600_000
    assert settings.expiration_threshold_ms == 3_600_000
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
