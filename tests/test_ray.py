"""The study fanned out on a local Ray instance (CPU only, GPUs declared so that
scheduling with num_gpus is exercised): the same runs and numbers as the local
executor, every training at the launching command's priority, as each recorded it (Ray's
default would run them at nice 15, where beside any busy process they barely progress;
the recorded niceness shows it without burning the cores to watch it).
Without Ray, `--executor ray` says how to install it (that test needs no Ray: it runs
exactly where Ray is missing)."""

from __future__ import annotations

import json
import os
import sys
import time

import mlflow
import pytest
from conftest import invoke, run_cli, silent_socket

from kd_mlflow import schema

pytestmark = pytest.mark.e2e  # studies and commands in their own processes


def _compare(env, experiment):
    out = run_cli("compare", "--experiment", experiment, "--format", "json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture
def ray():
    """Ray, or a skip before any study is run for nothing."""
    return pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'kd-mlflow[ray]'")


def test_ray_study_matches_the_local_one(ray, smoke_study):
    env = smoke_study.env
    study = ["reproduce", "--experiment", "ray-smoke", "--preset", "smoke", "--seeds", "0-1"]  # smoke_study's
    proc = run_cli(*study, "--executor", "ray", "--ray-local-gpus", "2", "--gpus-per-run", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    via_ray = _compare(env, "ray-smoke")
    local = _compare(env, smoke_study.experiment)  # the same study, run with the local executor

    client = mlflow.MlflowClient(smoke_study.server.uri)
    exp = client.get_experiment_by_name("ray-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    trained = [r for r in runs if r.data.tags.get(schema.ROLE) in ("train", "student")]
    assert len(trained) == 5 and {r.data.tags[schema.ENV_PREFIX + "nice"] for r in trained} == {str(os.nice(0))}
    for key, cols in (
        ("seeds", ("seed", "val_acc", "test_acc")),
        ("kd", ("seed", "val_acc", "test_acc")),
        ("self_distillation", ("student_seed", "student_val_acc", "student_test_acc")),
        ("ensembles", ("members", "val_acc", "test_acc")),
        ("sd_ensembles", ("members", "val_acc", "test_acc")),
    ):
        assert local[key], key
        assert [[r[c] for c in cols] for r in via_ray[key]] == [[r[c] for c in cols] for r in local[key]], key


def test_a_ray_address_that_never_answers_is_voiced_and_given_up_at_the_bound(ray, tmp_path):
    """Ray would retry for minutes, silently between its own warnings: the connection
    says what it waits for after 10 s and ends at the network bound, in one last line."""
    bound = 12
    with silent_socket() as silent:
        address = silent.removeprefix("http://")
        t0 = time.monotonic()
        proc = run_cli(
            *("reproduce", "--preset", "smoke", "--seeds", "0-1", "--executor", "ray", "--ray-address", address),
            env={"KD_MLFLOW_NETWORK_TIMEOUT": str(bound), "KD_MLFLOW_CACHE": str(tmp_path)},
            timeout=120,
        )
        seconds = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"waiting for the Ray cluster at {address} (10 s so far; gives up at {bound} s) ..." in lines, lines
    assert lines[-1] == (
        f"kd-mlflow: error: no answer from the Ray cluster at {address} within {bound} s; "
        "raise --network-timeout (KD_MLFLOW_NETWORK_TIMEOUT) or try later"
    )
    assert seconds < bound + 30, seconds  # the interpreter, torch and Ray start, then the bound
    assert "SIGTERM handler is not set" not in proc.stderr


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tracked):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    res = invoke("reproduce", "--preset", "smoke", "--seeds", "0-1", "--executor", "ray")
    # The request is valid; the machine lacks a package: the environment's exit code, as
    # for a missing optuna (errors.MissingExtra).
    assert res.exit_code == 1 and "pip install 'kd-mlflow[ray]'" in res.stderr
    assert tracked.runs() == []
