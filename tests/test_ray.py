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
import shutil
import signal
import sys
import threading
import time
import types

import mlflow
import pytest
import torch
from conftest import invoke, run_cli, silent_socket

from kd_mlflow import schema, tracking

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


def _trainings_of(parent: str) -> list[int]:
    """Pids of the step processes a Ray worker runs for the study run ``parent``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"kd_mlflow" in argv and any(parent.encode() in a for a in argv):  # in its serialised step
            pids.append(int(entry))
    return pids


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _kill_worker_mid_training(client, experiment_id, parent, checkpoints, killed):
    """Once the training has logged 2 epochs: freeze it, kill -9 its Ray worker, lose the
    node's checkpoints, kill -9 the training (as a node that dies takes both with it)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        found = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        logged = len(client.get_metric_history(found[0].info.run_id, "val_acc")) if found else 0
        pids = _trainings_of(parent)
        if logged >= 2 and pids:
            os.kill(pids[0], signal.SIGSTOP)  # it writes no checkpoint while the rest happens
            os.kill(_parent_pid(pids[0]), signal.SIGKILL)
            shutil.rmtree(checkpoints, ignore_errors=True)
            os.kill(pids[0], signal.SIGKILL)
            killed.append((found[0].info.run_id, logged))
        time.sleep(0.1)


def test_a_ray_worker_killed_mid_training_is_retried_and_continues_its_run(ray, tracked, tmp_path):
    """Ray retries a task whose worker died (its max_retries); the retry, with the node's
    checkpoints gone, continues the same run from the server's checkpoint and ends with
    the uninterrupted run's weights and metrics, each epoch logged once."""
    from kd_mlflow import executors
    from kd_mlflow.steps import Execution
    from kd_mlflow.study import Context, Progress, TrainStep

    epochs = 8
    session = tracking.connect(tracked.experiment)
    parent = session.client.create_run(session.experiment_id, run_name="ray-retry").info.run_id
    # A plan with what a train step's command line reads: one step, not a whole study.
    plan = types.SimpleNamespace(preset="smoke", overrides={"epochs": epochs}, data_dir=None)
    ctx = Context(plan, Execution(device="cpu", cache_dir=tmp_path / "cache"), parent, session)
    step = TrainStep(5)
    threads = executors.command(step, ctx)[1]["KD_MLFLOW_THREADS"]  # what the Ray task trains with
    ref_env = {"MLFLOW_EXPERIMENT_NAME": f"{tracked.experiment}-ref", "KD_MLFLOW_THREADS": threads}
    ref = run_cli("train", "--seed", "5", "--preset", "smoke", "--epochs", epochs, env=ref_env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = ref.stdout.strip().splitlines()[-1]

    killed: list = []
    args = (session.client, session.experiment_id, parent, tmp_path / "cache" / "checkpoints", killed)
    killer = threading.Thread(target=_kill_worker_mid_training, args=args, daemon=True)
    killer.start()
    ex = executors.Ray()
    try:
        (out,) = ex.run_wave([step], ctx, Progress(1, 1))
    finally:
        ex.close()
    killer.join(timeout=10)
    assert killed, "the training was never caught between its second and last epoch"
    run_id, logged = killed[0]
    assert logged < epochs  # killed before its end
    assert out.run_id == run_id and not out.reused  # the same run, continued
    client = mlflow.MlflowClient()
    run, ref_run = client.get_run(run_id), client.get_run(reference)
    assert run.info.status == "FINISHED"
    for key in schema.EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), key  # each epoch once
        ours = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        theirs = [m.value for m in sorted(client.get_metric_history(reference, key), key=lambda m: m.step)]
        assert ours == theirs, key
    a, b = (
        torch.load(mlflow.artifacts.download_artifacts(run_id=r, artifact_path="weights/model.pt"), weights_only=True)
        for r in (run_id, reference)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert run.data.metrics[schema.FINAL_TEST_ACC] == ref_run.data.metrics[schema.FINAL_TEST_ACC]
