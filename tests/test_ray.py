"""The study fanned out on a local Ray instance (CPU only, GPUs declared so that
scheduling with num_gpus is exercised): the same runs and numbers as the local executor."""

from __future__ import annotations

import json

import mlflow
import pytest
from conftest import run_cli

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'kd-mlflow[ray]'")


def _study(env, experiment, *extra):
    proc = run_cli("reproduce", "--experiment", experiment, "--preset", "smoke", "--seeds", "0-1", *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_cli("compare", "--experiment", experiment, "--format", "json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_ray_study_matches_the_local_one(server, cache_dir):
    env = {"MLFLOW_TRACKING_URI": server.uri, "KD_MLFLOW_CACHE": str(cache_dir)}
    via_ray = _study(env, "ray-smoke", "--executor", "ray", "--ray-local-gpus", "2", "--gpus-per-run", "1")
    local = _study(env, "study-smoke")  # reused if test_study already ran it

    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name("ray-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for key, cols in (
        ("seeds", ("seed", "val_acc", "test_acc")),
        ("kd", ("seed", "val_acc", "test_acc")),
        ("self_distillation", ("student_seed", "student_val_acc", "student_test_acc")),
        ("ensembles", ("members", "val_acc", "test_acc")),
        ("sd_ensembles", ("members", "val_acc", "test_acc")),
    ):
        assert [[r[c] for c in cols] for r in via_ray[key]] == [[r[c] for c in cols] for r in local[key]], key


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tracked):
    import sys

    from conftest import invoke

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    res = invoke("reproduce", "--preset", "smoke", "--seeds", "0-1", "--executor", "ray")
    assert res.exit_code == 2 and "pip install 'kd-mlflow[ray]'" in res.stderr
    assert tracked.runs() == []
