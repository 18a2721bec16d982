"""Shared fixtures: one real `mlflow server` per test session, one smoke study that
the files needing one share, a data/checkpoint cache shared by all tests, and a fresh
experiment per test.

Two tiers: a test that needs a tracking server, a subprocess or a study is ``e2e``; the
rest are unit tests, `pytest -m "not e2e"`, under a minute. A test is e2e when the
fixtures it really uses reach a root of E2E_ROOTS (a fixture that starts a server or
a process), or when it says so: `@pytest.mark.e2e`, or `pytestmark = pytest.mark.e2e`
where its whole module starts processes. Training in tests uses one thread, in this
process and in the commands it starts (KD_MLFLOW_THREADS), so results do not depend on
how busy the machine is."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import types
import uuid
from pathlib import Path

# As kd_mlflow.tracking does: MLflow's telemetry thread races os.environ (read before
# mlflow is imported).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parent.parent
SMOKE_EXPERIMENT = "study-smoke"

# The fixtures that start a server, a process or a study, by name and the file that
# defines them: a fixture elsewhere that only shares a name (a cheap sqlite `study`)
# is no root. Fixtures built on these (tracked, smoke_study, crafted, ...) reach them.
E2E_ROOTS = {
    ("server", "conftest.py"),  # the session's `mlflow server`
    ("git", "test_packaging.py"),  # a git checkout made with `git`
    ("own_server", "test_faults.py"),  # a server a test stops and starts
    ("stack", "test_stack.py"),  # PostgreSQL and the authenticated server
    ("restarted_once", "test_load.py"),  # the same stack, under load
}

os.environ["KD_MLFLOW_THREADS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs a tracking server, a subprocess or a whole study")


E2E_REASONS: dict[str, str | None] = {}  # every collected test's root fixture, before -m or -k deselect any


def pytest_collection_modifyitems(config, items):
    for item in items:
        E2E_REASONS[item.nodeid] = reason = e2e_reason(item)
        if reason:
            item.add_marker(pytest.mark.e2e)
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: say where each test runs
        _group_for_xdist(config, items, e2e)


# --- under `pytest -n` (pytest-xdist) ------------------------------------------------
#
# Each e2e test belongs to a group that one worker runs whole: its module, so that a
# module's fixture (a study, a server, a cluster) is made once; and the modules that read
# the session's smoke study together, so that it is made once. Unit tests have no group:
# each goes to whichever worker is free. (xdist's own `--dist loadgroup` renames items'
# node ids, which pytest 9 no longer lets it do: the groups travel in a file instead.)
#
# The longest start first, so that no worker is handed one of them when the others are
# nearly done: groups, and the modules of the longest unit tests (`--durations=0`, 2
# workers on this project's 2-core machine: the smoke study's readers about 200 s with
# the study, test_faults 193 s, test_paths 122 s; test_properties' property test 12 s).
LONGEST_FIRST = ("smoke_study", "test_faults", "test_paths", "test_properties", "test_models", "test_pack")
_GROUPS = pytest.StashKey[Path]()


def _groups_file(config) -> Path:
    if _GROUPS not in config.stash:
        config.stash[_GROUPS] = Path(tempfile.mkdtemp(prefix="kd-test-groups-")) / "groups.json"
    return config.stash[_GROUPS]


def _group_for_xdist(config, items, e2e) -> None:
    """(In a worker.) Each e2e test's group, written where the controller's scheduler
    reads it, and the items in the order the groups should start."""
    readers = {item.module.__name__ for item in e2e if "smoke_study" in item.fixturenames}
    groups = {item.nodeid: "smoke_study" if item.module.__name__ in readers else item.module.__name__ for item in e2e}
    path = Path(config.workerinput["kd_test_groups"])
    tmp = path.with_suffix(f".{config.workerinput['workerid']}")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)  # every worker writes the same, whole

    def rank(item):
        group = groups.get(item.nodeid)
        key = group or item.module.__name__
        return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST) + (group is None)

    items.sort(key=rank)  # stable: within a group, the collection's order


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(pytest-xdist, in the controller, per worker.) Where the workers write the groups."""
    node.workerinput["kd_test_groups"] = str(_groups_file(node.config))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """(pytest-xdist, in the controller.) A group's tests go to one worker, groups in the
    order the workers' collection put them; each unit test alone."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order above, not "most tests first"
    path = _groups_file(config)

    class ByGroup(LoadScopeScheduling):
        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # every worker has collected (and written) by now
                self.groups = json.loads(path.read_text())
            return self.groups.get(nodeid, nodeid)

    return ByGroup(config, log)


def pytest_unconfigure(config):
    if _GROUPS in config.stash:
        shutil.rmtree(config.stash[_GROUPS].parent, ignore_errors=True)


def e2e_reason(item) -> str | None:
    """The root fixture that makes ``item`` e2e, or None (its own mark may still)."""
    # item.fixturenames is the whole closure: the fixtures' own fixtures, transitively.
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        fixturedefs = info.name2fixturedefs.get(name) if info else None
        # The definition closest to the test (the one it gets) names its file.
        if fixturedefs and (name, Path(inspect.getfile(fixturedefs[-1].func)).name) in E2E_ROOTS:
            return f"fixture {name}"
    return None


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


def torch_switches() -> dict:
    """The process-wide switches that change a number (make_runtime sets them on CUDA)."""
    import torch

    return {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


@pytest.fixture(scope="session")
def torch_defaults() -> dict:
    """The switches as this process started with them, before any test: torch's
    defaults, as a fresh process has them."""
    return torch_switches()


@pytest.fixture(autouse=True)
def _fresh_torch_switches(torch_defaults):
    """Each test starts from torch's defaults, whatever the tests before it set."""
    yield
    if torch_switches() != torch_defaults:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch_defaults["tf32_matmul"]
        torch.backends.cudnn.allow_tf32 = torch_defaults["tf32_cudnn"]
        torch.backends.cudnn.benchmark = torch_defaults["cudnn_benchmark"]
        torch.use_deterministic_algorithms(
            torch_defaults["deterministic"], warn_only=torch_defaults["deterministic_warn_only"]
        )


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server") / "store").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kd-cache")


@pytest.fixture
def tracked(server, cache_dir, monkeypatch):
    """Environment for one test: the session's server, a new experiment name."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    env = {"MLFLOW_TRACKING_URI": server.uri, "KD_MLFLOW_CACHE": str(cache_dir), "MLFLOW_EXPERIMENT_NAME": name}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(server.uri)
    yield Tracked(server.uri, name, env)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def smoke_study(server, cache_dir):
    """The smoke study with two seeds, run once per session as a user runs it (`kd-mlflow
    reproduce` in its own process) into the experiment study-smoke, for the files that
    only read a study (test_study, test_ray). A test that adds runs to an experiment
    uses its own."""
    env = {"MLFLOW_TRACKING_URI": server.uri, "KD_MLFLOW_CACHE": str(cache_dir)}
    # Whichever test asks first, none of its run or experiment settings leak in.
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID" and not k.startswith("MLFLOW_EXPERIMENT_")}
    args = ("reproduce", "--experiment", SMOKE_EXPERIMENT, "--preset", "smoke", "--seeds", "0-1")
    proc = run_cli(*args, env={**clean, **env}, exact_env=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from kd_mlflow import schema

    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name(SMOKE_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get(schema.STUDY) == "true"]
    return types.SimpleNamespace(
        server=server,
        env=env,
        args=args,
        proc=proc,
        experiment=SMOKE_EXPERIMENT,
        experiment_id=exp.experiment_id,
        steps={r.info.run_name: r.info.run_id for r in runs if r.data.tags.get(schema.ROLE)},
        parent_run_id=parent,
    )


class Tracked:
    def __init__(self, uri, experiment, env):
        self.uri, self.experiment, self.env = uri, experiment, env
        self.client = mlflow.MlflowClient(uri)

    def runs(self, statuses=None):
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        runs = self.client.search_runs([exp.experiment_id], max_results=1000)
        return [r for r in runs if statuses is None or r.info.status in statuses]


def run_cli(*args, env=None, cwd=None, timeout=600, exact_env=False, **popen):
    """The real command in a fresh process (what a user types). ``env`` adds to this
    process's environment, or replaces it with ``exact_env=True``."""
    full_env = dict(env) if exact_env else {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kd_mlflow", *map(str, args)],
        env=full_env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def mlflow_run(entry, params: dict, env: dict, experiment=None, timeout=900):
    """`mlflow run . -e ENTRY -P k=v ... --env-manager local` in a fresh process, in
    ``env`` (whole), with this interpreter's bin first on PATH (where `kd-mlflow` is)."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    if experiment:
        cmd += ["--experiment-name", experiment]
    env = {**env, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def silent_socket():
    """A loopback port that accepts every connection and never answers (as a tracking
    server, as the proxy a download goes through, as a Ray cluster)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for c in held:
            c.close()
        sock.close()


def invoke(*args):
    """The real CLI in this process (fast: no interpreter start-up per call)."""
    from kd_mlflow.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])
