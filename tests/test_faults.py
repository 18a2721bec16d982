"""Fault injection against real `mlflow server` processes: kill -9, SIGTERM, the server
going away, corrupted checkpoints, concurrent launches, a planted pickle."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import REPO
from mlflow_server import MlflowServer

from kd_mlflow import config, data, schema

TRAIN = ["train", "--seed", "4", "--preset", "smoke", "--epochs", "6"]


def _env(tracked, cache, **extra):
    return {**os.environ, **tracked.env, "KD_MLFLOW_CACHE": str(cache), **extra}


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "kd_mlflow", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(proc, needle, timeout=300):
    """Read stderr until a line contains ``needle``; return what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


def _finish(args, env):
    proc = subprocess.run(
        [sys.executable, "-m", "kd_mlflow", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    return proc


def _steps(client, run_id, key="val_acc"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _weights(run_id):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights/model.pt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The same configuration trained without interruption, in another experiment."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_EXPERIMENT_NAME": "faults-reference",
        "KD_MLFLOW_CACHE": str(tmp_path_factory.mktemp("ref-cache")),
    }
    proc = _finish(TRAIN, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def _assert_same_result(tracked, run_id, reference):
    run = tracked.client.get_run(run_id)
    ref = tracked.client.get_run(reference)
    assert run.info.status == "FINISHED"
    for key in schema.EPOCH_METRICS:
        assert _steps(tracked.client, run_id, key) == [1, 2, 3, 4, 5, 6], key  # each epoch once
    a, b = _weights(run_id), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert run.data.metrics[schema.FINAL_TEST_ACC] == ref.data.metrics[schema.FINAL_TEST_ACC]


def test_kill_9_then_rerun_resumes_the_same_run_bitwise(tracked, tmp_path, reference):
    env = _env(tracked, tmp_path / "cache")
    proc = _start(TRAIN, env)
    _wait_for_line(proc, "epoch 2/6")
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    (killed,) = tracked.runs()
    assert killed.info.status == "RUNNING"

    again = _finish(TRAIN, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == killed.info.run_id
    assert len(tracked.runs()) == 1
    _assert_same_result(tracked, killed.info.run_id, reference)


def _killed_at(args, env, needle):
    """Start ``args`` and kill -9 it once stderr shows ``needle``."""
    proc = _start(args, env)
    _wait_for_line(proc, needle)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    return proc


def _checkpoint_artifacts(client, run_id):
    return [f.path for f in client.list_artifacts(run_id, "checkpoint")]


def test_kill_9_then_rerun_on_another_machine_continues_from_the_servers_checkpoint(tracked, tmp_path, reference):
    """Killed on machine A, whose checkpoints are then lost; rerun on machine B (another
    checkpoint dir): B fetches the run's checkpoint from the server and continues the
    same run, as if never interrupted; at the end the server keeps no checkpoint."""
    _killed_at(TRAIN, _env(tracked, tmp_path / "cache-a"), "epoch 2/6")
    (killed,) = tracked.runs()
    assert killed.info.status == "RUNNING"
    assert _checkpoint_artifacts(tracked.client, killed.info.run_id)  # uploaded by A
    shutil.rmtree(tmp_path / "cache-a")  # machine A is gone, and its disk with it

    again = _finish([*TRAIN, "--cache-dir", str(tmp_path / "cache-b")], _env(tracked, tmp_path / "unused"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "from the tracking server" in again.stderr and "resuming after epoch" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == killed.info.run_id
    assert len(tracked.runs()) == 1
    _assert_same_result(tracked, killed.info.run_id, reference)
    assert _checkpoint_artifacts(tracked.client, killed.info.run_id) == []  # finished: storage does not grow


def test_a_run_with_epochs_but_no_checkpoint_anywhere_is_superseded_not_mixed(tracked, tmp_path, reference):
    """Killed on one machine with uploads off, rerun where its checkpoint is not (another
    cache): its logged epochs cannot be continued, so a new run trains and the old one
    ends FAILED saying why; no run's curves mix two trainings."""
    _killed_at(TRAIN, _env(tracked, tmp_path / "cache-a", KD_MLFLOW_CHECKPOINT_EVERY="0"), "epoch 2/6")
    (killed,) = tracked.runs()
    assert _checkpoint_artifacts(tracked.client, killed.info.run_id) == []

    again = _finish(TRAIN, _env(tracked, tmp_path / "cache-b"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "has no checkpoint to continue from, here or on the server" in again.stderr
    new_id = again.stdout.strip().splitlines()[-1]
    assert new_id != killed.info.run_id
    old = tracked.client.get_run(killed.info.run_id)
    assert old.info.status == "FAILED" and new_id in old.data.tags[schema.FAILURE]
    _assert_same_result(tracked, new_id, reference)


def test_kill_9_a_packed_wave_then_rerun_elsewhere_continues_its_runs(tracked, tmp_path):
    """A packed wave's one checkpoint is on the server with the first of its runs: a rerun
    with another checkpoint dir continues both runs."""
    wave = ["train", "--seeds", "3-4", "--pack", "--preset", "smoke", "--epochs", "6"]
    _killed_at(wave, _env(tracked, tmp_path / "cache-a"), "epoch 3/6")
    killed = {r.info.run_name: r.info.run_id for r in tracked.runs()}
    assert sorted(killed) == ["train-seed-3", "train-seed-4"]

    again = _finish(wave, _env(tracked, tmp_path / "cache-b"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "from the tracking server" in again.stderr and "resuming after epoch" in again.stderr
    runs = tracked.runs()
    assert {r.info.run_name: r.info.run_id for r in runs} == killed  # the same two runs, finished
    for r in runs:
        assert r.info.status == "FINISHED"
        assert _checkpoint_artifacts(tracked.client, r.info.run_id) == []
        for key in schema.EPOCH_METRICS:
            assert _steps(tracked.client, r.info.run_id, key) == [1, 2, 3, 4, 5, 6], key  # each epoch once


def test_a_bad_checkpoint_cadence_is_refused_before_any_run(tracked, tmp_path):
    out = _finish(TRAIN, _env(tracked, tmp_path / "cache", KD_MLFLOW_CHECKPOINT_EVERY="often"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "invalid value for KD_MLFLOW_CHECKPOINT_EVERY: 'often' "
            "(a number of epochs >= 0 (0: never), or of minutes > 0 such as 30m)"
        )
    )
    assert "Traceback" not in out.stderr and tracked.runs() == []


def test_kill_9_a_packed_wave_then_rerun_resumes_its_runs(tracked, tmp_path):
    wave = ["train", "--seeds", "3-4", "--pack", "--preset", "smoke", "--epochs", "6"]
    env = _env(tracked, tmp_path / "cache")
    proc = _start(wave, env)
    _wait_for_line(proc, "epoch 3/6")
    proc.kill()
    proc.wait()
    killed = {r.info.run_name: r.info.run_id for r in tracked.runs()}
    assert sorted(killed) == ["train-seed-3", "train-seed-4"]

    again = _finish(wave, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch" in again.stderr
    runs = tracked.runs()
    assert {r.info.run_name: r.info.run_id for r in runs} == killed  # the same two runs, finished
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        for key in schema.EPOCH_METRICS:
            assert _steps(tracked.client, r.info.run_id, key) == [1, 2, 3, 4, 5, 6], key  # each epoch once


def test_sigterm_marks_killed_and_the_next_run_finishes_it(tracked, tmp_path, reference):
    env = _env(tracked, tmp_path / "cache")
    proc = _start(TRAIN, env)
    _wait_for_line(proc, "epoch 1/6")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    (run,) = tracked.runs()
    assert run.info.status == "KILLED"

    again = _finish(TRAIN, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == run.info.run_id
    _assert_same_result(tracked, run.info.run_id, reference)


def test_corrupted_checkpoint_is_reported_and_skipped(tracked, tmp_path, reference):
    env = _env(tracked, tmp_path / "cache")
    proc = _start(TRAIN, env)
    _wait_for_line(proc, "epoch 3/6")
    proc.kill()
    proc.wait()
    ckpts = sorted((tmp_path / "cache" / "checkpoints").rglob("epoch-*.ckpt"))
    assert ckpts
    blob = bytearray(ckpts[-1].read_bytes())
    blob[len(blob) // 2] ^= 0x10  # one flipped bit
    ckpts[-1].write_bytes(bytes(blob))

    again = _finish(TRAIN, env)
    assert again.returncode == 0, again.stderr[-2000:]
    warnings = [line for line in again.stderr.splitlines() if "checksum mismatch" in line]
    assert len(warnings) == 1 and ckpts[-1].name in warnings[0]
    _assert_same_result(tracked, again.stdout.strip().splitlines()[-1], reference)


def test_two_launches_at_once_train_once(tracked, tmp_path):
    env = _env(tracked, tmp_path / "cache")
    a, b = _start(TRAIN, env), _start(TRAIN, env)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == b.returncode == 0, err_a[-1500:] + err_b[-1500:]
    assert out_a.strip().splitlines()[-1] == out_b.strip().splitlines()[-1]
    assert [("epoch 1/6" in e) for e in (err_a, err_b)].count(True) == 1
    assert [r.info.status for r in tracked.runs()] == ["FINISHED"]


def test_the_launch_that_loses_the_experiment_race_uses_the_winners(tracked):
    """Between this launch's lookup and its create, another launch creates the
    experiment (what two `kd-mlflow train` started together do): the loser adopts it."""
    from kd_mlflow import tracking

    class Late(mlflow.MlflowClient):
        lookups = 0

        def get_experiment_by_name(self, name):
            Late.lookups += 1
            if Late.lookups == 1:
                mlflow.MlflowClient(tracked.uri).create_experiment(name)  # the other launch
                return None
            return super().get_experiment_by_name(name)

    exp_id = tracking._resolve_experiment(Late(tracked.uri), tracked.experiment, create=True)
    winner = tracked.client.get_experiment_by_name(tracked.experiment)
    assert exp_id == winner.experiment_id and Late.lookups == 2
    assert winner.tags.get(tracking.EXPERIMENT_KIND_TAG) == tracking.EXPERIMENT_KIND


@pytest.fixture
def own_server(tmp_path):
    srv = MlflowServer(tmp_path / "own-store").start()
    yield srv
    srv.stop()


def test_server_outage_mid_training_loses_nothing(tracked, tmp_path, own_server):
    env = _env(tracked, tmp_path / "cache", MLFLOW_TRACKING_URI=own_server.uri)
    args = ["train", "--seed", "2", "--preset", "smoke", "--epochs", "12"]
    proc = _start(args, env)
    _wait_for_line(proc, "epoch 1/12")
    own_server.stop()
    _wait_for_line(proc, "metrics kept locally")
    own_server.start()  # same port, same store
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(own_server.uri)
    run_id = out.strip().splitlines()[-1]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in schema.EPOCH_METRICS:
        assert _steps(client, run_id, key) == list(range(1, 13)), key


def test_server_down_at_the_end_then_rerun_uploads_without_training(tracked, tmp_path, own_server):
    # A server that answered before is waited for at the end, up to the bound: 10 s here.
    env = _env(tracked, tmp_path / "cache", MLFLOW_TRACKING_URI=own_server.uri, KD_MLFLOW_NETWORK_TIMEOUT="10")
    args = ["train", "--seed", "2", "--preset", "smoke", "--epochs", "3"]
    proc = _start(args, env)
    _wait_for_line(proc, "epoch 1/3")
    own_server.stop()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("kd-mlflow: error: ") and "could not be delivered" in last
    assert "run the same command again" in last and own_server.uri in last

    own_server.start()
    again = _finish(args, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch 3" in again.stderr and "epoch 1/3" not in again.stderr
    client = mlflow.MlflowClient(own_server.uri)
    run_id = again.stdout.strip().splitlines()[-1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id) == [1, 2, 3]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_teacher_is_refused_and_never_runs(tracked, tmp_path):
    marker = tmp_path / "pwned"
    src = data.load("digits")
    digest = data.make_split(src, config.preset("smoke")).digest
    exp_id = tracked.client.create_experiment(tracked.experiment)
    run = tracked.client.create_run(
        exp_id,
        tags={
            schema.ROLE: "train",
            schema.PRESET: "smoke",
            schema.DATASET: "digits",
            schema.SEED: "0",
            schema.SPLIT_DIGEST: digest,
            schema.NUM_CLASSES: "10",
        },
    )
    rid = run.info.run_id
    for k, v in config.preset("smoke").as_params().items():
        tracked.client.log_param(rid, k, v)
    (tmp_path / "weights").mkdir()
    with open(tmp_path / "weights" / "model.pt", "wb") as f:
        pickle.dump({"net.fc.weight": _Payload(marker)}, f)
    tracked.client.log_artifact(rid, str(tmp_path / "weights" / "model.pt"), "weights")
    tracked.client.set_terminated(rid, "FINISHED")

    proc = _finish(["distill", "--teacher", rid, "--seed", "1"], _env(tracked, tmp_path / "cache"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kd-mlflow: error: invalid value for teacher")
    assert "weights refused" in proc.stderr
    assert not marker.exists()
    assert [r.info.run_id for r in tracked.runs()] == [rid]
