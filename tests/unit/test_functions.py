"""What the Functions host reads of each function: the bindings in its function.json, checked as the host checks
them when it indexes the app (tests/support/function_json.py). Each function's main() against the real services:
tests/integration/test_functions.py; loaded by the real worker: tests/integration/test_real_worker.py."""

import json
import shutil

import pytest

from shared.events import CHECK_EXPIRING, REFRESH_REQUESTED
from shared.settings import TIMER_TICK_MS
from tests.support.function_json import binding_problems, ncrontab
from tests.support.helpers import APP_ROOT

FUNCTIONS = ("check_expiring_timer", "manager_check_handler", "sync_refresh_handler")


def test_every_function_json_passes_the_checks_the_functions_host_makes():
    folders = sorted(path.parent for path in APP_ROOT.glob("*/function.json"))
    assert [folder.name for folder in folders] == list(FUNCTIONS)
    for folder in folders:
        assert binding_problems(folder) == []


def test_function_json_bindings_match_the_queues_and_connection():
    for folder, queue in (("manager_check_handler", CHECK_EXPIRING), ("sync_refresh_handler", REFRESH_REQUESTED)):
        with open(APP_ROOT / folder / "function.json") as handle:
            [binding] = json.load(handle)["bindings"]
        assert binding == {
            "name": "message",
            "type": "serviceBusTrigger",
            "direction": "in",
            "queueName": queue,
            "connection": "ServiceBusConnection",
        }  # no isSessionsEnabled: the refresh queue has no sessions (localdev/service_bus_queues.json)
    with open(APP_ROOT / "check_expiring_timer" / "function.json") as handle:
        [binding] = json.load(handle)["bindings"]
    assert binding["type"] == "timerTrigger" and binding["name"] == "timer"


def test_the_timer_ticks_once_a_minute_as_the_settings_assume():
    """Checks are TOKEN_REFRESH_INTERVAL_MS rounded up to the timer's tick apart (shared/settings.py TIMER_TICK_MS)."""
    [binding] = json.loads((APP_ROOT / "check_expiring_timer" / "function.json").read_text())["bindings"]
    second, *rest = ncrontab(binding["schedule"])
    assert TIMER_TICK_MS == 60_000 and len(second) == 1
    assert [len(values) for values in rest] == [60, 24, 31, 12, 7]  # every minute of every hour, day, month


@pytest.mark.parametrize(
    ("schedule", "matches"),
    [
        ("0 */1 * * * *", [{0}, set(range(60)), set(range(24)), set(range(1, 32)), set(range(1, 13)), set(range(7))]),
        ("30 0,15-20/5 9 1 Jan mon-fri", [{30}, {0, 15, 20}, {9}, {1}, {1}, {1, 2, 3, 4, 5}]),
        ("0 0 0 * DEC sun", [{0}, {0}, {0}, set(range(1, 32)), {12}, {0}]),
    ],
)
def test_ncrontab_expressions_match_what_the_host_runs_them_at(schedule, matches):
    assert [set(values) for values in ncrontab(schedule)] == matches


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        ("not a cron", "3 fields, not 6"),
        ("*/5 * * * *", "5 fields, not 6"),  # classic 5-field cron: the host wants seconds too
        ("60 * * * * *", "'60' is not a second from 0 to 59"),
        ("0 * * 0 * *", "'0' is not a day from 1 to 31"),
        ("0 * * * Foo *", "'Foo' is not a month"),
        ("0 */0 * * * *", "step '0' is not a whole number above 0"),
        ("0 5-1 * * * *", "runs backwards"),
    ],
)
def test_a_schedule_the_host_cannot_parse_is_refused_saying_why(schedule, error):
    with pytest.raises(ValueError, match=error):
        ncrontab(schedule)


def edited_function(tmp_path, name: str, edit) -> object:
    """A copy of function folder `name` with its single binding edited by `edit(binding)`."""
    folder = tmp_path / name
    shutil.copytree(APP_ROOT / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    definition = json.loads((folder / "function.json").read_text())
    edit(definition["bindings"][0])
    (folder / "function.json").write_text(json.dumps(definition))
    return folder


@pytest.mark.parametrize(
    ("name", "edit", "problem"),
    [
        ("check_expiring_timer", lambda b: b.update(schedule="not a cron"), "the schedule is not NCRONTAB: "),
        ("check_expiring_timer", lambda b: b.pop("schedule"), "the timer has no schedule"),
        ("check_expiring_timer", lambda b: b.update(schedule="%TIMER_SCHEDULE%"), "names setting TIMER_SCHEDULE"),
        ("sync_refresh_handler", lambda b: b.pop("connection"), "connection 'AzureWebJobsServiceBus': the settings"),
        ("manager_check_handler", lambda b: b.update(connection="ServiceBusConection"), "'ServiceBusConection'"),
        ("sync_refresh_handler", lambda b: b.update(queueName="refresh-requested"), "not a queue scripts/deploy.sh"),
        ("sync_refresh_handler", lambda b: b.update(isSessionsEnabled=True), "isSessionsEnabled=True but queue"),
        ("manager_check_handler", lambda b: b.pop("direction"), "a binding without direction"),
        ("manager_check_handler", lambda b: b.update(direction="out"), "direction 'out', not 'in'"),
        ("sync_refresh_handler", lambda b: b.update(name="msg"), "main()'s parameters ['message'] are not"),
    ],
)
def test_a_binding_the_host_would_refuse_is_reported(tmp_path, name, edit, problem):
    problems = binding_problems(edited_function(tmp_path, name, edit))
    assert any(problem in text for text in problems), problems
    assert all(text.startswith(f"{name}/function.json: ") for text in problems)


def test_a_schedule_taken_from_a_setting_is_checked_in_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "tests.support.function_json.known_settings", lambda: (set(), {"TIMER_SCHEDULE": "*/1 * * * *"})
    )
    folder = edited_function(tmp_path, "check_expiring_timer", lambda b: b.update(schedule="%TIMER_SCHEDULE%"))
    assert binding_problems(folder) == [
        "check_expiring_timer/function.json: the schedule is not NCRONTAB: '*/1 * * * *' has 5 fields, not 6 "
        "(second minute hour day month day-of-week)"
    ]
