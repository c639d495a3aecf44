"""What the Functions host checks of a function folder's function.json when it indexes a v1 app, and what this
app's deployment adds to it. The host reports a function error at start-up for a timer schedule that does not
parse and for a Service Bus trigger whose connection setting is missing, and a trigger on a queue that does not
exist never receives a message: in Azure only. The real-worker tests (tests/integration/test_real_worker.py) never
see any of them, because the host, not the worker, reads those fields.

- A `timerTrigger`'s `schedule` is an NCRONTAB expression with six fields (second minute hour day month
  day-of-week); `%NAME%` takes it from the setting NAME. (The TimeSpan form `hh:mm:ss` runs on an App Service
  plan only, not on the Flex Consumption plan scripts/deploy.sh creates.)
- A `serviceBusTrigger`'s `connection` (the host's default: `AzureWebJobsServiceBus`) names a setting holding a
  connection string, or the prefix of `<connection>__fullyQualifiedNamespace` (identity-based).
- Its `queueName` and `isSessionsEnabled` are those of a queue scripts/deploy.sh creates: the queues of
  localdev/service_bus_queues.json, which deploy.sh reads.
- Every binding has a `type`, a `direction` and a `name`; the worker passes each binding as main()'s parameter of
  that name (and `context`), so the names and main()'s parameters are the same.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parents[2]
QUEUES_FILE = APP_ROOT / "localdev" / "service_bus_queues.json"
EXAMPLE_SETTINGS = APP_ROOT / "local.settings.json.example"

# The Service Bus extension's connection setting when a binding names none.
DEFAULT_SERVICE_BUS_CONNECTION = "AzureWebJobsServiceBus"
IDENTITY_SUFFIX = "__fullyQualifiedNamespace"
DIRECTIONS = ("in", "out", "inout")
SETTING_REFERENCE = re.compile(r"%([^%]+)%")

# NCRONTAB's six fields, each with its range and the names it accepts (case-insensitive).
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # Sunday = 0
_MONTHS = {name: number for number, name in enumerate(MONTH_NAMES, 1)}
_DAYS = {name: number for number, name in enumerate(DAY_NAMES)}
NCRONTAB_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)


def ncrontab(schedule: str) -> tuple[frozenset[int], ...]:
    """The values each of the six fields of an NCRONTAB expression matches; ValueError says what does not parse."""
    fields = schedule.split()
    if len(fields) != len(NCRONTAB_FIELDS):
        raise ValueError(f"{schedule!r} has {len(fields)} fields, not 6 (second minute hour day month day-of-week)")
    return tuple(_field_values(text, *field) for text, field in zip(fields, NCRONTAB_FIELDS, strict=True))


def _field_values(text: str, kind: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    def number(word: str) -> int:
        value = names.get(word.lower()) if word.isalpha() else int(word) if word.isdigit() else None
        if value is None or not low <= value <= high:
            raise ValueError(f"{kind} field {text!r}: {word!r} is not a {kind} from {low} to {high}")
        return value

    values: set[int] = set()
    for item in text.split(","):
        span, _, step = item.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            raise ValueError(f"{kind} field {text!r}: step {step!r} is not a whole number above 0")
        if span == "*":
            first, last = low, high
        else:
            first_word, dash, last_word = span.partition("-")
            first = number(first_word)
            last = number(last_word) if dash else first
            if last < first:
                raise ValueError(f"{kind} field {text!r}: the range {span!r} runs backwards")
        values.update(range(first, last + 1, int(step or 1)))
    return frozenset(values)


def known_settings() -> tuple[set[str], dict[str, str]]:
    """The settings the app's model knows (shared/settings.py) and the Values of local.settings.json.example."""
    from shared.settings import setting_fields

    example = json.loads(EXAMPLE_SETTINGS.read_text(encoding="utf-8"))["Values"]
    return set(setting_fields()), example


def deployed_queues() -> dict[str, dict[str, Any]]:
    """The Service Bus queues scripts/deploy.sh creates, with their properties."""
    return json.loads(QUEUES_FILE.read_text(encoding="utf-8"))["queues"]


def binding_problems(folder: Path) -> list[str]:
    """Every way `folder`'s function.json fails the host's checks above; empty when the host would run it."""
    definition = json.loads((folder / "function.json").read_text(encoding="utf-8"))
    bindings = definition.get("bindings", [])
    problems = [problem for binding in bindings for problem in _binding_problems(binding)]
    triggers = [binding for binding in bindings if str(binding.get("type", "")).endswith("Trigger")]
    if len(triggers) != 1:
        problems.append(f"{len(triggers)} trigger bindings, not 1")
    problems.extend(_parameter_problems(folder, definition, bindings))
    return [f"{folder.name}/function.json: {problem}" for problem in problems]


def _binding_problems(binding: dict[str, Any]) -> list[str]:
    missing = [field for field in ("type", "direction", "name") if not binding.get(field)]
    if missing:
        return [f"a binding without {', '.join(missing)}: {binding}"]
    if binding["direction"] not in DIRECTIONS:
        return [f"binding {binding['name']!r}: direction {binding['direction']!r} is not one of {DIRECTIONS}"]
    if binding["type"].endswith("Trigger") and binding["direction"] != "in":
        return [f"trigger {binding['name']!r}: direction {binding['direction']!r}, not 'in'"]
    if binding["type"] == "timerTrigger":
        return _schedule_problems(binding)
    if binding["type"] == "serviceBusTrigger":
        return _service_bus_problems(binding)
    return []


def _schedule_problems(binding: dict[str, Any]) -> list[str]:
    schedule = binding.get("schedule")
    if not isinstance(schedule, str) or not schedule.strip():
        return ["the timer has no schedule"]
    _, example = known_settings()
    if reference := SETTING_REFERENCE.fullmatch(schedule.strip()):
        name = reference.group(1)
        if name not in example:
            return [f"the schedule {schedule!r} names setting {name}, which local.settings.json.example lacks"]
        schedule = example[name]
    try:
        ncrontab(schedule)
    except ValueError as error:
        return [f"the schedule is not NCRONTAB: {error}"]
    return []


def _service_bus_problems(binding: dict[str, Any]) -> list[str]:
    problems = []
    connection = binding.get("connection", DEFAULT_SERVICE_BUS_CONNECTION)
    model, example = known_settings()
    forms = (connection, connection + IDENTITY_SUFFIX)
    for where, known in (("the settings model (shared/settings.py)", model), ("local.settings.json.example", example)):
        if not any(form in known for form in forms):
            problems.append(f"connection {connection!r}: {where} has neither {forms[0]} nor {forms[1]}")
    queues = deployed_queues()
    queue = binding.get("queueName")
    if queue not in queues:
        problems.append(f"queueName {queue!r} is not a queue scripts/deploy.sh creates ({QUEUES_FILE.name})")
    else:
        sessions = bool(binding.get("isSessionsEnabled", False))
        if sessions != bool(queues[queue].get("requiresSession", False)):
            problems.append(f"isSessionsEnabled={sessions} but queue {queue!r} has requiresSession={not sessions}")
    return problems


def _parameter_problems(folder: Path, definition: dict[str, Any], bindings: list[dict[str, Any]]) -> list[str]:
    script = folder / definition.get("scriptFile", "__init__.py")
    entry_point = definition.get("entryPoint", "main")
    if not script.is_file():
        return [f"scriptFile {script.name} does not exist"]
    tree = ast.parse(script.read_text(encoding="utf-8"))
    functions = [
        node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
    ]
    if not functions:
        return [f"{script.name} has no function {entry_point}()"]
    arguments = functions[0].args
    parameters = {argument.arg for argument in (*arguments.args, *arguments.kwonlyargs)} - {"context"}
    names = {str(binding.get("name")) for binding in bindings}
    if parameters != names:
        return [f"{entry_point}()'s parameters {sorted(parameters)} are not the bindings' names {sorted(names)}"]
    return []
