"""Shared fixtures: one real `mlflow server` per test session, a data/checkpoint cache
shared by all tests, and a fresh experiment per test.

Two tiers: a test that needs a tracking server, a subprocess or a study is marked
``e2e`` (automatically, from the fixtures it uses, or by its module); the rest are unit
tests, `pytest -m "not e2e"`, under a minute. Training in tests uses one thread, in this
process and in the commands it starts (KD_MLFLOW_THREADS), so results do not depend on
how busy the machine is."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parent.parent
E2E_FIXTURES = {"server", "tracked", "study", "stack", "crafted", "reference", "own_server", "report"}

os.environ["KD_MLFLOW_THREADS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs a tracking server, a subprocess or a whole study")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


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


def invoke(*args):
    """The real CLI in this process (fast: no interpreter start-up per call)."""
    from kd_mlflow.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])
