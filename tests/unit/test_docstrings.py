"""Every deployed module documents its public entry points: the module itself, each public module-level
function and class, and each public method of a public class (no leading underscore; dunders are out).
Deployed = the three function folders' `__init__.py` and the `shared/` package."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_FOLDERS = ("check_expiring_timer", "manager_check_handler", "sync_refresh_handler")

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def deployed_modules() -> list[Path]:
    return [ROOT / folder / "__init__.py" for folder in FUNCTION_FOLDERS] + sorted((ROOT / "shared").rglob("*.py"))


def public_definitions(tree: ast.Module) -> list[tuple[str, Definition]]:
    """(qualified name, node) of each public module-level function and class, and of each public method
    (properties included) of a public class."""
    found: list[tuple[str, Definition]] = []
    for node in tree.body:
        if isinstance(node, Definition) and not node.name.startswith("_"):
            found.append((node.name, node))
            if isinstance(node, ast.ClassDef):
                found.extend(
                    (f"{node.name}.{method.name}", method)
                    for method in node.body
                    if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef) and not method.name.startswith("_")
                )
    return found


def documented(node: ast.Module | Definition) -> bool:
    return bool((ast.get_docstring(node) or "").strip())


def gaps() -> list[tuple[str, str, int]]:
    """(path, qualified name, line) of each module or public definition without a docstring."""
    missing = []
    for path in deployed_modules():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not documented(tree):
            missing.append((relative, "(module)", 1))
        missing.extend((relative, name, node.lineno) for name, node in public_definitions(tree) if not documented(node))
    return missing


def test_every_public_definition_of_a_deployed_module_has_a_docstring():
    missing = [f"{path}:{line} {name}" for path, name, line in gaps()]
    assert not missing, (
        "public definitions of deployed modules without a docstring (say what it does, for whom, and the "
        "non-obvious contract):\n  " + "\n  ".join(missing)
    )


def test_the_walk_covers_the_deployed_entry_points():
    # Guards the test above against passing vacuously (a walk that finds no file or no definition).
    found = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in deployed_modules()
        for name, _ in public_definitions(ast.parse(path.read_text(encoding="utf-8")))
    }
    for entry_point in [
        *((f"{folder}/__init__.py", "main") for folder in FUNCTION_FOLDERS),
        ("shared/expiring_check.py", "request_refresh_for_expiring_connections"),
        ("shared/token_refresh.py", "refresh_connection_token"),
        ("shared/messaging/publisher.py", "EventPublisher.publish"),
        ("shared/claim.py", "Claims.acquire"),
        ("shared/connection_store.py", "ConnectionStore.expiring_connection_pages"),
    ]:
        assert entry_point in found
