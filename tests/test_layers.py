"""The packages stand in layers: each imports only the ones below it (an AST scan).

common (the root error) < monitoring < bus < bridge, bot_client < tradebus (the commands).
A command module lives in tradebus/, so the lower packages never reach up into the CLI,
and bridge and bot_client, siblings on top of bus, never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tradebus.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages it may import besides itself
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "monitoring": frozenset({"common"}),
    "bus": frozenset({"common", "monitoring"}),
    "bridge": frozenset({"common", "monitoring", "bus"}),
    "bot_client": frozenset({"common", "monitoring", "bus"}),
    "tradebus": frozenset({"common", "monitoring", "bus", "bridge", "bot_client"}),
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``path``, nested ones included."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name.partition(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.partition(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    ours = set(ALLOWED)
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for imported, line in sorted(imported_packages(path))
        if imported in ours and imported != package and imported not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def defines_a_command(path: Path) -> bool:
    """Whether the module has a command's surface: ``HELP``, ``configure`` and ``run``."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return {"HELP", "configure", "run"} <= names


def test_no_command_module_outside_tradebus() -> None:
    lower = [package for package in ALLOWED if package != "tradebus"]
    commands = [
        str(path.relative_to(ROOT))
        for package in lower
        for path in sorted((ROOT / package).rglob("*.py"))
        if defines_a_command(path)
    ]
    assert not commands
    assert defines_a_command(ROOT / "tradebus" / "proxy.py")


def test_every_command_module_lives_in_tradebus() -> None:
    elsewhere = {
        name: module for name, module in COMMANDS.items() if module.partition(".")[0] != "tradebus"
    }
    assert not elsewhere


def test_the_scan_sees_an_inverted_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tradebus.arguments import whole_number\n")
    assert imported_packages(module) == {("tradebus", 2)}
