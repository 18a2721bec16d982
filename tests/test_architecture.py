"""The layout's rules, checked on the package's source: MLflow stays in its home, the
choices live in one table, and MLproject's parameters are options of the commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
import yaml

from kd_mlflow import config
from kd_mlflow.cli import main

PACKAGE = Path(__file__).resolve().parent.parent / "kd_mlflow"
REPO = PACKAGE.parent
# The MLflow adapter: server (every call bounded and in our words), claims (one process
# per configuration) and tracking (runs, models, experiments); runs is the one home of a
# run's life.
MLFLOW_HOME = {"server.py", "claims.py", "tracking.py", "runs.py"}
# An MLflow entity read outside the home: its tags/params/metrics, its info, or a
# system tag such as "mlflow.runName".
ENTITY = re.compile(r"\.data\.(tags|params|metrics)\b|\.info\.(run_id|status|experiment_id)\b")
SYSTEM_TAG = re.compile(r"""["']mlflow\.[A-Za-z]""")


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_only_the_tracking_home_knows_mlflow(path):
    if path.name in MLFLOW_HOME:
        return
    source = path.read_text()
    assert "mlflow" not in _imports(ast.parse(source)), f"{path.name} imports mlflow"
    assert not ENTITY.search(source), f"{path.name} reads an MLflow entity: {ENTITY.search(source).group()}"
    assert not SYSTEM_TAG.search(source), f"{path.name} names an mlflow.* tag: {SYSTEM_TAG.search(source).group()}"


def test_the_home_is_named_by_modules_that_exist():
    """A module renamed or merged away leaves no stale name that would let a new file of
    that name import mlflow unnoticed."""
    assert {p.name for p in PACKAGE.glob("*.py")} >= MLFLOW_HOME


def test_the_rule_catches_a_violation(tmp_path):
    """The check above can fail: it flags each kind of leak in a planted module."""
    planted = {"a.py": "import mlflow\n", "b.py": "x = run.data.tags\n", "c.py": "t = 'mlflow.runName'\n"}
    for name, text in planted.items():
        tree = ast.parse(text)
        assert "mlflow" in _imports(tree) or ENTITY.search(text) or SYSTEM_TAG.search(text), name


def _options(command: click.Command) -> set[str]:
    return {opt.lstrip("-").replace("-", "_") for p in command.params for opt in p.opts}


def test_every_mlproject_parameter_is_an_option_of_its_command():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["entry_points"], "no entry points"
    for name, entry in project["entry_points"].items():
        words = entry["command"].split()
        assert words[:3] == ["python", "-m", "kd_mlflow"], (name, words[:3])
        command = main.commands[words[3]]
        for param in entry.get("parameters", {}):
            assert param in _options(command), f"MLproject {name}: {param} is not an option of {words[3]}"
            assert "{" + param + "}" in entry["command"], f"MLproject {name}: {param} is declared but not passed"


def test_choices_come_from_one_table():
    """Every click.Choice the CLI offers equals a tuple of config.CHOICES."""
    tables = {tuple(v) for v in config.CHOICES.values()}
    seen = 0
    for command in main.commands.values():
        for p in command.params:
            inner = getattr(p.type, "inner", p.type)
            if isinstance(inner, click.Choice):
                seen += 1
                assert tuple(inner.choices) in tables, (command.name, p.name, inner.choices)
    assert seen >= 10


def test_recipe_checks_use_the_same_table():
    for name in ("dataset", "model", "optimizer", "schedule", "precision"):
        with pytest.raises(config.ConfigError) as e:
            config.resolve("smoke", **{name: "nonsense"})
        assert ", ".join(config.CHOICES[name]) in str(e.value)


def _package_edges(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at any depth (function-level imports
    too: they are still a dependency, only a later one)."""
    mods = {f.stem for f in package.glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((package / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package.name}."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.ImportFrom) and node.module == package.name:
                names = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def _a_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order), or None: depth-first search."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_itself_back():
    circle = _a_circle(_package_edges(PACKAGE))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_check_catches_one_behind_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("def g():\n    from .a import x\n")
    assert _a_circle(_package_edges(pkg)) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("def g():\n    pass\n")
    assert _a_circle(_package_edges(pkg)) is None
