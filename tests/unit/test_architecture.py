"""The layout's rules (docs/architecture.md), checked on the import statements of every module: what
ships to Azure never imports the local tooling, and no adapter imports another adapter's helpers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_FOLDERS = ("check_expiring_timer", "manager_check_handler", "sync_refresh_handler")
# Each talks to one outside system; what two of them share lives below them (ids, times, errors).
ADAPTERS = ("shared.connection_store", "shared.state_store", "shared.manager_client", "shared.messaging")
# Below everything else: they import no other module of the app but each other.
LEAVES = (
    "shared.errors",
    "shared.times",
    "shared.ids",
    "shared.failure_classes",
    "shared.http_pool",
    "shared.telemetry",
    "shared.third_party_logs",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import`/`from … import` of the file names (type-checking-only ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def deployed_files() -> list[Path]:
    files = sorted((ROOT / "shared").rglob("*.py"))
    return files + [ROOT / folder / "__init__.py" for folder in FUNCTION_FOLDERS]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", deployed_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_deployed_code_never_imports_the_local_tooling_the_tests_or_a_function_folder(path):
    forbidden = {
        name
        for name in imported_modules(path)
        if any(within(name, top) for top in ("localdev", "tests", "bench", *FUNCTION_FOLDERS))
        and not within(module_name(path), name)
    }
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_adapter_imports_another_adapter(adapter):
    files = [p for p in deployed_files() if within(module_name(p), adapter)]
    assert files
    for path in files:
        others = {name for name in imported_modules(path) for a in ADAPTERS if a != adapter and within(name, a)}
        assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}: move what they share below both"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_only_other_leaves(leaf):
    path = ROOT / (leaf.replace(".", "/") + ".py")
    app_imports = {name for name in imported_modules(path) if within(name, "shared") and name != "shared"}
    assert all(any(within(name, other) for other in LEAVES) for name in app_imports), sorted(app_imports)


def test_the_rules_see_real_imports():
    # The checker itself: token_refresh does import three adapters; the timer imports shared.
    names = imported_modules(ROOT / "shared" / "token_refresh.py")
    assert {"shared.connection_store", "shared.state_store", "shared.manager_client"} <= {
        n for n in names if n.count(".") == 1
    }
    assert any(within(n, "shared") for n in imported_modules(ROOT / "check_expiring_timer" / "__init__.py"))
