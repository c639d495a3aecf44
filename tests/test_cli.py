"""The CLI's settings loading (as `func start` does it) and its usage errors."""

import json

import pytest

from shared.cli import build_parser, load_local_settings, main


def write_local_settings(folder, values):
    path = folder / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    return path


def test_local_settings_values_fill_the_environment_but_environment_wins(tmp_path):
    path = write_local_settings(tmp_path, {"TOKEN_REFRESH_INTERVAL_MS": "60000", "RABBITMQ_EXCHANGE": "from-file"})
    environ = {"RABBITMQ_EXCHANGE": "from-env"}
    assert load_local_settings(environ, search=(tmp_path,)) == path
    assert environ == {"RABBITMQ_EXCHANGE": "from-env", "TOKEN_REFRESH_INTERVAL_MS": "60000"}


def test_first_folder_with_a_file_is_used(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_local_settings(second, {"X": "2"})
    environ: dict[str, str] = {}
    assert load_local_settings(environ, search=(first, second)) == second / "local.settings.json"
    assert environ == {"X": "2"}


def test_broken_local_settings_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "local.settings.json").write_text("{ not json")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--dry-run"]) == 2
    assert "local.settings.json is not valid JSON" in capsys.readouterr().err


def test_bad_setting_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKEN_REFRESH_INTERVAL_MS", "hourly")
    assert main(["check", "--dry-run"]) == 2
    assert "TOKEN_REFRESH_INTERVAL_MS" in capsys.readouterr().err


def test_check_without_cosmos_endpoint_explains_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COSMOS_ENDPOINT", raising=False)
    monkeypatch.setattr("shared.cli.APP_ROOT", tmp_path)
    from shared import runtime

    runtime.reset()
    assert main(["check", "--dry-run"]) == 2
    assert "COSMOS_ENDPOINT is not set" in capsys.readouterr().err
    runtime.reset()


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["check"], ["run", "--max-deliveries", "many"], ["run", "--max-deliveries", "0"]]
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2
