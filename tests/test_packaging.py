"""What binds a run to the code and the environment that made it: the version (one
source), the source digest, the git commit only of kd-mlflow's own checkout; one list
of dependencies (pyproject.toml) that conda.yaml, the training image and CI follow; and
CI's order: lint, types, unit tier, e2e tier."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import E2E_REASONS, REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from kd_mlflow import schema, tracking

PACKAGE = REPO / "kd_mlflow"
PYPROJECT = REPO / "pyproject.toml"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML itself")
    return tomllib.loads(PYPROJECT.read_text())


def _copy_package(dest: Path) -> Path:
    """The package's source files, as a wheel or an image would hold them."""
    dest.mkdir(parents=True)
    for path in PACKAGE.rglob("*.py"):
        (dest / path.relative_to(PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.relative_to(PACKAGE))
    return dest


# --- provenance ----------------------------------------------------------------


def test_version_is_the_installed_metadata_of_pyprojects_version():
    import kd_mlflow

    installed = metadata.version("kd-mlflow")
    assert kd_mlflow.__version__ == tracking._version() == installed
    # The installed metadata is this tree's pyproject (else reinstall: pip install -e .).
    assert installed == _pyproject()["project"]["version"]


def test_version_without_an_install_reads_pyproject_else_says_unknown(tmp_path, monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    tree = tmp_path / "clone"
    copy = _copy_package(tree / "kd_mlflow")
    spec = importlib.util.spec_from_file_location("kd_mlflow_copy", copy / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._version() == "0+unknown"  # no pyproject.toml beside it
    (tree / "pyproject.toml").write_text('[project]\nname = "kd-mlflow"\nversion = "9.8.7"\n')
    assert module._version() == "9.8.7"


def test_source_digest_names_the_source_and_changes_with_one_byte(tmp_path):
    digest = tracking._source_digest()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert tracking._source_digest() is digest  # computed once per process
    same = _copy_package(tmp_path / "same" / "kd_mlflow")
    assert tracking._source_digest(same) == digest  # content, not location
    edited = _copy_package(tmp_path / "edited" / "kd_mlflow")
    target = edited / "objectives.py"
    text = bytearray(target.read_bytes())
    text[-2] ^= 1  # one byte, near the end
    target.write_bytes(bytes(text))
    assert tracking._source_digest(edited) != digest
    renamed = _copy_package(tmp_path / "renamed" / "kd_mlflow")
    (renamed / "objectives.py").rename(renamed / "objectives2.py")
    assert tracking._source_digest(renamed) != digest
    (renamed / "__pycache__").mkdir()
    (renamed / "__pycache__" / "x.pyc").write_bytes(b"not source")
    assert tracking._source_digest.__wrapped__(renamed) == tracking._source_digest(renamed)


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


@pytest.fixture
def git():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return _git


def test_an_install_inside_another_repository_records_no_commit(tmp_path, git):
    project = tmp_path / "someone-elses-project"
    copy = _copy_package(project / ".venv" / "lib" / "site-packages" / "kd_mlflow")
    git(project, "init", "-q")
    git(project, "add", "-f", ".")
    git(project, "commit", "-q", "-m", "their project, with kd-mlflow installed in its venv")
    assert git(copy, "rev-parse", "HEAD")  # git itself would answer with their commit
    assert tracking._git_tag(copy) == {}
    # Nor a copy in no repository at all (a Docker image, a wheel).
    assert tracking._git_tag(_copy_package(tmp_path / "image" / "kd_mlflow")) == {}


def test_a_clone_records_its_commit_and_whether_the_package_differs(tmp_path, git):
    clone = tmp_path / "kd-mlflow"
    _copy_package(clone / "kd_mlflow")
    (clone / "README.md").write_text("kd-mlflow\n")
    git(clone, "init", "-q")
    git(clone, "add", ".")
    git(clone, "commit", "-q", "-m", "kd-mlflow")
    sha = git(clone, "rev-parse", "HEAD")
    tag = tracking._git_tag.__wrapped__  # the same folder, asked again after each change
    assert tag(clone / "kd_mlflow") == {schema.GIT_COMMIT: sha, schema.GIT_DIRTY: "false"}
    # Outside the package: a local store, notes, an edited README do not change a number.
    (clone / "mlflow.db").write_bytes(b"")
    (clone / "README.md").write_text("edited\n")
    assert tag(clone / "kd_mlflow")[schema.GIT_DIRTY] == "false"
    (clone / "kd_mlflow" / "new_module.py").write_text("X = 1\n")  # untracked, in the package
    assert tag(clone / "kd_mlflow") == {schema.GIT_COMMIT: sha, schema.GIT_DIRTY: "true"}
    (clone / "kd_mlflow" / "new_module.py").unlink()
    with (clone / "kd_mlflow" / "objectives.py").open("a") as f:
        f.write("# edited\n")
    assert tag(clone / "kd_mlflow")[schema.GIT_DIRTY] == "true"


def test_every_run_of_a_study_records_the_code_that_made_it(smoke_study):
    import mlflow

    client = mlflow.MlflowClient(smoke_study.server.uri)
    runs = [client.get_run(r) for r in [*smoke_study.steps.values(), smoke_study.parent_run_id]]
    assert len(runs) == 8
    expected = {
        schema.VERSION: metadata.version("kd-mlflow"),
        schema.SOURCE_DIGEST: tracking._source_digest(),
        **tracking._git_tag(),  # here: the commit of this checkout (none in an installed copy)
    }
    for run in runs:
        tags = run.data.tags
        assert {k: tags.get(k) for k in (schema.VERSION, schema.SOURCE_DIGEST)} == {
            k: expected[k] for k in (schema.VERSION, schema.SOURCE_DIGEST)
        }, run.info.run_name
        assert {k: tags.get(k) for k in (schema.GIT_COMMIT, schema.GIT_DIRTY)} == {
            k: expected.get(k) for k in (schema.GIT_COMMIT, schema.GIT_DIRTY)
        }, run.info.run_name


# --- one list of dependencies ----------------------------------------------------


def _declared(*extras: str) -> set[str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_every_package_kd_mlflow_imports_is_declared():
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "kd_mlflow"}
    distributions = metadata.packages_distributions()
    declared = _declared("ray", "optuna")  # imported only by --executor ray, --search optuna: their extras
    missing = {
        module: distributions.get(module)
        for module in third_party
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
    assert {"PIL", "torch", "mlflow", "numpy"} <= third_party  # the scan sees the imports


def test_conda_env_installs_the_package_over_a_python_pin_and_nothing_else():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [{"pip": ["-e ."]}], "the dependencies are pyproject.toml's: conda.yaml installs the package"
    assert sorted(c.split("=")[0] for c in conda) == ["pip", "python"]
    (python,) = [c.split("=", 1)[1] for c in conda if c.startswith("python=")]
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(python + ".0")


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M))


def test_ci_and_the_training_image_install_the_same_torch():
    args = _dockerfile_args()
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH"]) and re.fullmatch(r"\d+\.\d+\.\d+", args["TORCHVISION"])
    assert args["BASE"].startswith("pytorch/pytorch:${TORCH}-"), "the base image holds the pinned torch"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'pip install . "torch==${TORCH}" "torchvision==${TORCHVISION}"' in dockerfile
    ci = (REPO / ".ci" / "run").read_text()
    assert 'dockerfile_arg() { sed -n "s/^ARG $1=//p" docker/Dockerfile; }' in ci
    assert '"torch==$(dockerfile_arg TORCH)" "torchvision==$(dockerfile_arg TORCHVISION)"' in ci
    assert not re.search(r"torch(vision)?==\d", ci), "a second copy of the pins"
    # pyproject's range admits them.
    deps = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    assert deps["torch"].specifier.contains(args["TORCH"])
    assert deps["torchvision"].specifier.contains(args["TORCHVISION"])


@pytest.mark.skipif(not __import__("os").environ.get("CI"), reason="CI's own environment (CI=true)")
def test_ci_runs_the_torch_of_the_training_image():
    import torch
    import torchvision

    args = _dockerfile_args()
    assert torch.__version__.split("+")[0] == args["TORCH"]
    assert torchvision.__version__.split("+")[0] == args["TORCHVISION"]


# --- CI and pre-commit ------------------------------------------------------------


def _ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_ci_lints_and_types_before_the_unit_tier_and_that_before_e2e():
    commands = _ci_commands()

    def at(command: str) -> int:
        assert command in commands, f".ci/run does not run {command!r}"
        return commands.index(command)

    install = next(i for i, c in enumerate(commands) if "install" in c and ".[test,lint]" in c)
    order = [
        at("ruff check ."),
        at("ruff format --check ."),
        at("mypy"),
        at('python -m pytest -q -m "not e2e"'),
        at("python -m pytest -q -m e2e"),
    ]
    assert install < order[0] and order == sorted(order)
    postgres = next(i for i, c in enumerate(commands) if "install-postgres.sh" in c)
    assert order[3] < postgres < order[4], "PostgreSQL is for the e2e tier: the unit tier does not wait for it"
    # The two tiers are the whole suite: one says "e2e", the other its negation.
    assert sum("pytest" in c for c in commands) == 2


def test_ci_installs_the_linters_it_runs_at_pinned_versions():
    lint = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["lint"]]
    pins = {r.name: str(r.specifier) for r in lint}
    assert re.fullmatch(r"==[\d.]+", pins["ruff"]) and re.fullmatch(r"==[\d.]+", pins["mypy"])


def test_pre_commit_runs_what_ci_runs_with_the_same_tools():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert {h["entry"].split(" --")[0] for h in hooks.values()} == {"ruff check", "ruff format", "mypy"}
    assert all(repo["repo"] == "local" for repo in config["repos"]), "offline: the tools the lint extra installs"
    assert all(h["language"] == "system" for h in hooks.values())
    assert hooks["mypy"]["pass_filenames"] is False  # mypy's files are pyproject's, as in CI


# --- the tiers --------------------------------------------------------------------


def test_the_tiers_follow_the_fixtures_a_test_really_uses(request):
    """This session's own tests (all collected, whatever -m or -k then selected): a test
    reaching a server, a process or a study is e2e; one whose cheap fixture only shares
    a name with an expensive one is not."""
    mine = {n.split("::")[1]: r for n, r in E2E_REASONS.items() if n.startswith("tests/test_packaging.py::")}
    assert mine["test_every_run_of_a_study_records_the_code_that_made_it"] == "fixture server"  # through smoke_study
    assert mine["test_an_install_inside_another_repository_records_no_commit"] == "fixture git"
    assert mine["test_source_digest_names_the_source_and_changes_with_one_byte"] is None
    assert mine["test_the_tiers_follow_the_fixtures_a_test_really_uses"] is None
    assert request.node.get_closest_marker("e2e") is None


SAMPLE_E2E = '''
import os, subprocess
import pytest

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Stands for a study: says where and how often it is made."""
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(f"fixture {os.environ['PYTEST_XDIST_WORKER']}\\n")

@pytest.mark.e2e
@pytest.mark.parametrize("i", range(6))
def test_uses_the_module_fixture(made, i):
    subprocess.run(["true"], check=True)
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(f"test {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''

SAMPLE_UNIT = """
import os

def test_unit(i=0):
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(f"unit {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""


@pytest.mark.e2e  # pytest -n 2 in its own process
def test_under_xdist_an_e2e_module_runs_whole_on_one_worker(tmp_path):
    """conftest's scheduler, run as `pytest -n 2` runs it, on a module whose six e2e tests
    share a module fixture, beside unit tests: the fixture is made once, and its tests run
    on one worker. (xdist's own loadgroup silently stopped grouping under pytest 9.)
    Which worker runs a unit test depends on timing: not asserted."""
    for name in ("conftest.py", "mlflow_server.py"):
        shutil.copy2(REPO / "tests" / name, tmp_path / name)
    (tmp_path / "test_sample_e2e.py").write_text(SAMPLE_E2E)
    for k in range(8):
        (tmp_path / f"test_sample_unit_{k}.py").write_text(SAMPLE_UNIT)
    log = tmp_path / "log"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-c", "/dev/null", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "SAMPLE_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = log.read_text().split()
    events = list(zip(lines[::2], lines[1::2], strict=True))
    made = [w for what, w in events if what == "fixture"]
    tests = {w for what, w in events if what == "test"}
    assert len(made) == 1 and tests == set(made), events
    assert len([e for e in events if e[0] == "test"]) == 6
    assert len([e for e in events if e[0] == "unit"]) == 8
