"""The CLI's settings loading (as `func start` does it), its usage errors and its logging, without
services. `check --dry-run` and `trigger` against the real local services: tests/e2e/test_cli.py."""

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from localdev.cli import build_parser, load_local_settings, main
from shared.runtime import QUIET_LOGGERS
from shared.third_party_logs import demote_third_party_logs


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


def test_check_without_cosmos_endpoint_explains_what_is_missing_and_prints_no_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COSMOS_ENDPOINT", raising=False)
    monkeypatch.setattr("localdev.cli.APP_ROOT", tmp_path)
    from shared import runtime

    runtime.reset()
    assert main(["check", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "COSMOS_ENDPOINT is not set" in captured.err
    assert captured.out == ""  # no table header that reads as "nothing is due"
    runtime.reset()


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["check"], ["run", "--max-deliveries", "many"], ["run", "--max-deliveries", "0"]]
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2


@contextlib.contextmanager
def root_handler_records(level: int) -> Iterator[list[logging.LogRecord]]:
    """What the root logger's handlers get at this root level (caplog is no help here: pytest also
    attaches it to non-propagating loggers, so it sees a library's records before they are demoted)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    level_before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level_before)


def test_library_records_are_demoted_to_debug_and_shown_only_when_the_root_logs_debug():
    library = f"lib{uuid.uuid4().hex[:8]}"
    demote_third_party_logs((library,))
    demote_third_party_logs((library,))  # idempotent: one handler
    assert len(logging.getLogger(library).handlers) == 1
    child = logging.getLogger(f"{library}.adapters.connection")  # its records bypass the top logger's filters
    with root_handler_records(logging.INFO) as records:
        child.error("Socket failed to connect")
    assert records == []
    with root_handler_records(logging.DEBUG) as records:  # -v
        demote_third_party_logs((library,))  # the library's level follows the root's
        child.error("Socket failed to connect")
        child.debug("connecting")
    assert [(r.name, r.levelname, r.levelno, r.getMessage()) for r in records] == [
        (child.name, "DEBUG", logging.DEBUG, "Socket failed to connect"),
        (child.name, "DEBUG", logging.DEBUG, "connecting"),
    ]


def test_the_functions_workers_own_records_keep_their_level():
    with root_handler_records(logging.INFO) as records:
        demote_third_party_logs(QUIET_LOGGERS)
        logging.getLogger("azure.functions").error("Native invocation failed")
        logging.getLogger("azure.core.pipeline").error("an SDK's own error")
        logging.getLogger("pika.adapters.blocking_connection").error("Connection workflow failed")
    assert [(r.name, r.levelname) for r in records] == [("azure.functions", "ERROR")]
