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
# The one home of mlflow's imports: the package kd_mlflow.tracking (runs, models,
# experiments; its server module: every call bounded and in our words; its claims
# module: one process per configuration). runs, the one home of a run's life, reads
# MLflow's entities but imports nothing of mlflow.
MLFLOW_HOME = PACKAGE / "tracking"
ENTITY_HOME = {PACKAGE / "runs.py"}
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


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_tracking_home_knows_mlflow(path):
    if MLFLOW_HOME in path.parents:
        return
    source = path.read_text()
    assert "mlflow" not in _imports(ast.parse(source)), f"{path.name} imports mlflow"
    if path in ENTITY_HOME:
        return
    assert not ENTITY.search(source), f"{path.name} reads an MLflow entity: {ENTITY.search(source).group()}"
    assert not SYSTEM_TAG.search(source), f"{path.name} names an mlflow.* tag: {SYSTEM_TAG.search(source).group()}"


def test_the_home_is_named_by_modules_that_exist():
    """A module renamed or merged away leaves no stale name that would let a new file of
    that name import mlflow unnoticed."""
    assert (MLFLOW_HOME / "__init__.py").is_file() and all(p.is_file() for p in ENTITY_HOME)


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
    mods = {f.stem for f in package.glob("*.py")} | {d.name for d in package.iterdir() if (d / "__init__.py").is_file()}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for path in package.rglob("*.py"):  # a subpackage's modules are its node
        rel = path.relative_to(package).parts
        m, top_level = rel[0].removesuffix(".py"), len(rel)  # the relative level that names the package's modules
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == top_level:
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
    (pkg / "sub").mkdir()  # a subpackage is one node: its modules' imports of the package's
    (pkg / "sub" / "__init__.py").write_text("from . import inner\n")
    (pkg / "sub" / "inner.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from .sub import inner\n")
    assert _a_circle(_package_edges(pkg)) == ["a", "b", "c", "sub", "a"]
