"""The dependency rule, checked on the source: each room imports only what its docstring allows.

``dispatch`` uses ``channels``, ``ratelimit`` and ``monitoring``; those never import ``dispatch``;
only ``loadtest`` and the tests import ``loadtest``. Inside ``dispatch``, the stages point one
way: ``rules`` and ``store`` below ``plan``, ``plan`` below ``send``, ``send`` below ``triggered``
and ``api``, the command line on top. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: room -> rooms (of dispatch, or top-level packages) it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "channels": ("dispatch", "loadtest", "ratelimit", "monitoring"),
    "ratelimit": ("dispatch", "loadtest", "channels", "monitoring"),
    "monitoring": ("dispatch", "loadtest", "channels", "ratelimit"),
    "dispatch": ("loadtest",),
    "dispatch.store": (
        "dispatch.rules",
        "dispatch.plan",
        "dispatch.send",
        "dispatch.api",
        "dispatch.triggered",
        "dispatch.cli",
    ),
    "dispatch.rules": ("dispatch.plan", "dispatch.send", "dispatch.api", "dispatch.triggered", "dispatch.cli"),
    "dispatch.plan": ("dispatch.send", "dispatch.api", "dispatch.triggered", "dispatch.cli"),
    "dispatch.send": ("dispatch.api", "dispatch.triggered", "dispatch.cli"),
    "dispatch.triggered": ("dispatch.cli", "dispatch.api.app", "dispatch.api.client"),
    "dispatch.api": ("dispatch.cli",),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


SOURCES = sorted(p for pkg in ("dispatch", "channels", "ratelimit", "monitoring") for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    module = _module(path)
    rules = [(room, banned) for room, banned in FORBIDDEN.items() if _within(module, room)]
    wrong = sorted(
        f"{module} imports {name}"
        for name in _imports(path)
        for _, banned in rules
        for room in banned
        if _within(name, room)
    )
    assert not wrong, wrong


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    probe = ROOT / "dispatch" / "plan" / "calibration.py"
    assert "dispatch.store.keys" in _imports(probe) or "dispatch.store" in _imports(probe)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from loadtest.demo import run_demo\n")
    assert "loadtest.demo" in _imports(bad)
