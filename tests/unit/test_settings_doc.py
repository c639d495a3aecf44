"""Settings as the single source of truth: docs/settings.md's table and the SettingsError messages are
derived from the settings model (shared/settings.py), and the doc cannot drift from it."""

import difflib

import pytest

from localdev import settings_doc
from shared.settings import (
    FUNCTION_TIMEOUT_MS,
    LOCK_RENEWAL_MS,
    Settings,
    SettingsError,
    expected_form,
    load_settings,
    setting_fields,
)

# The design contract (docs/settings.md): each setting and the default it states ("—" = none).
DESIGN_SETTINGS = {
    "TOKEN_REFRESH_ENABLED": "`true`",
    "TOKEN_REFRESH_INTERVAL_MS": "`3600000`",
    # Not the runbook's 3600000, which trips the app's own warning (the runbook's values: RUNBOOK_SETTINGS).
    "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "`4200000`",
    "COSMOS_ENDPOINT": "—",
    "COSMOS_KEY": "—",
    "COSMOS_DATABASE": "`integrations`",
    "COSMOS_CONNECTIONS_CONTAINER": "`integration_connections`",
    "ServiceBusConnection": "—",
    "ServiceBusConnection__fullyQualifiedNamespace": "—",
    "RABBITMQ_URL": "—",
    "RABBITMQ_EXCHANGE": "`integration.events`",
    "INTEGRATION_MANAGER_URL": "—",
    "INTEGRATION_MANAGER_TOKEN": "—",
}

# The platform's runbook values: accepted (with the risky-threshold warning) and documented as the runbook's.
RUNBOOK_SETTINGS = {"TOKEN_REFRESH_INTERVAL_MS": "3600000", "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS": "3600000"}

# What leads each rule of Settings._check_settings_agree in docs/settings.md#settings-that-must-agree, in order.
AGREEMENT_RULES = (
    "`TOKEN_REFRESH_RETRY_DELAY_MS` = 0 and `INTEGRATION_MANAGER_IN_FLIGHT_MS` > `INTEGRATION_MANAGER_RETRY_BUDGET_MS`",
    f"calls window > {min(LOCK_RENEWAL_MS, FUNCTION_TIMEOUT_MS)} ms",
    "`TOKEN_REFRESH_CLAIM_LEASE_MS` < the calls window",
    "`TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS` < `TOKEN_REFRESH_INTERVAL_MS` rounded up to whole minutes",
    "`TOKEN_REFRESH_RATE_LIMITS` set and `TOKEN_REFRESH_RETRY_DELAY_MS` = 0",
)


def doc_section(heading: str) -> str:
    text = settings_doc.DOC.read_text(encoding="utf-8")
    start = text.index(f"\n### {heading}\n")
    end = text.find("\n#", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_the_doc_states_each_rule_of_the_settings_that_must_agree_once_with_the_host_json_limits():
    rows = [line for line in doc_section("Settings that must agree").splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(AGREEMENT_RULES), rows
    for rule, row in zip(AGREEMENT_RULES, rows, strict=True):
        assert row.startswith(f"| {rule}"), (rule, row)


def test_the_doc_states_the_defaults_and_the_runbooks_values():
    section = " ".join(doc_section("Defaults").split())
    defaults = Settings.model_fields
    assert f"`TOKEN_REFRESH_INTERVAL_MS` defaults to `{defaults['interval_ms'].default}`" in section
    assert f"`TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS` to `{defaults['expiration_threshold_ms'].default}`" in section
    for setting, value in RUNBOOK_SETTINGS.items():
        assert f"`{setting}={value}`" in section
    load_settings(RUNBOOK_SETTINGS)  # accepted


def documented_rows() -> dict[str, list[str]]:
    """The settings table as docs/settings.md holds it: setting → [default, meaning]."""
    text = settings_doc.DOC.read_text(encoding="utf-8")
    table = text[text.index(settings_doc.BEGIN) + len(settings_doc.BEGIN) : text.index(settings_doc.END)]
    rows = {}
    for line in (line for line in table.splitlines() if line.startswith("| `")):
        name, default, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        assert name.strip("`") not in rows, f"{name} is in the table twice"
        rows[name.strip("`")] = [default, meaning]
    return rows


def test_the_settings_table_in_the_doc_is_the_one_generated_from_the_model():
    text = settings_doc.DOC.read_text(encoding="utf-8")
    generated = settings_doc.render_doc(text)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True), generated.splitlines(keepends=True), "docs/settings.md", "generated"
        )
    )
    assert generated == text, (
        f"docs/settings.md's settings table differs from the model in shared/settings.py. "
        f"Regenerate it with:\n\n    {settings_doc.REGENERATE}\n\n{diff}"
    )


def test_the_doc_lists_every_setting_of_the_model_once_with_its_description():
    rows = documented_rows()
    assert list(rows) == list(setting_fields())
    for setting, field in setting_fields().items():
        assert field.description, f"{setting} has no description= on its Field"
        assert rows[setting][1].startswith(field.description)


def test_the_design_contract_settings_are_documented_with_their_defaults():
    rows = documented_rows()
    for setting, default in DESIGN_SETTINGS.items():
        assert setting in rows, f"{setting} (the design contract) is missing from docs/settings.md"
        documented = rows[setting][0]
        assert documented == default or documented.startswith(default + " ("), (setting, documented)


def test_every_setting_has_an_expected_form_of_its_own():
    for setting in setting_fields():
        assert expected_form(setting) != "see docs/settings.md", (
            f"{setting}: its type cannot say what a value looks like; give its Field "
            'json_schema_extra={"expected": "..."}'
        )


def bounded_settings() -> list:
    params = []
    for setting, field in setting_fields().items():
        bounds = {name: getattr(item, name) for item in field.metadata for name in ("ge", "le") if hasattr(item, name)}
        if bounds:
            assert set(bounds) == {"ge", "le"}, f"{setting}: a number setting has both bounds"
            params.append(pytest.param(setting, bounds, id=setting))
    return params


@pytest.mark.parametrize(("setting", "bounds"), bounded_settings())
def test_a_value_out_of_bounds_is_refused_stating_the_bounds_of_the_field(setting, bounds):
    """The limits in the message (and so in the doc) are the field's, whatever they are changed to."""
    with pytest.raises(SettingsError) as raised:
        load_settings({setting: str(bounds["le"] + 1)})
    message = str(raised.value)
    assert f"{setting}: " in message
    assert f" from {bounds['ge']}" in message and f" to {bounds['le']}" in message, message
    with pytest.raises(SettingsError, match=f" from {bounds['ge']}"):
        load_settings({setting: str(bounds["ge"] - 1)})


@pytest.mark.parametrize(
    ("setting", "form"),
    [
        ("TOKEN_REFRESH_INTERVAL_MS", "a whole number of milliseconds from 1000 to 604800000 (7 days)"),
        ("TOKEN_REFRESH_MAX_AGE_MS", "a whole number of milliseconds from 0 (off) to 315360000000 (10 years)"),
        ("TOKEN_REFRESH_PAGE_SIZE", "a whole number of connections per page from 1 to 1000"),
        ("TOKEN_REFRESH_ENABLED", "true or false"),
        ("RABBITMQ_URL", "an amqp:// or amqps:// URL"),
    ],
)
def test_expected_forms_read_as_a_person_would_write_them(setting, form):
    assert expected_form(setting) == form


def test_the_regenerate_command_rewrites_only_the_table_and_check_reports_drift(tmp_path, capsys):
    doc = tmp_path / "settings.md"
    original = settings_doc.render_doc(settings_doc.DOC.read_text(encoding="utf-8"))
    drifted = original.replace("| `TOKEN_REFRESH_PAGE_SIZE` | `200` |", "| `TOKEN_REFRESH_PAGE_SIZE` | `100` |")
    assert drifted != original
    doc.write_text(drifted, encoding="utf-8")

    assert settings_doc.main(["--check"], doc=doc) == 1
    assert settings_doc.REGENERATE in capsys.readouterr().err
    assert doc.read_text(encoding="utf-8") == drifted  # --check writes nothing

    assert settings_doc.main([], doc=doc) == 0
    assert doc.read_text(encoding="utf-8") == original
    assert settings_doc.main(["--check"], doc=doc) == 0


def test_a_doc_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="settings-table"):
        settings_doc.render_doc("# Settings\n\n| setting | default | meaning |\n")
