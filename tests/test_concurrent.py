"""One identity, one run, across processes: the claims of kd_mlflow.tracking.claims.claimed on
a real `mlflow server`, two identical studies at once, a claim whose holder died, and
the Model Registry under concurrent registrations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import mlflow
import pytest
import torch
from conftest import REPO, invoke, run_cli

from kd_mlflow import config, runs, schema, steps, tracking
from kd_mlflow.tracking import claims

LEASE = "2"  # seconds: a claim whose holder is gone is taken over this fast here


def _claims(client) -> list[str]:
    return [m.name for m in client.search_registered_models(f"name LIKE '{claims.CLAIM_PREFIX}-%'")]


def test_a_registered_model_name_is_won_by_one_of_many_racing_creators(tracked):
    """The primitive the claims rest on, as the server enforces it: of eight clients
    creating one registered model's name at once, one succeeds and seven are told
    RESOURCE_ALREADY_EXISTS."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    start, outcomes = threading.Barrier(8), []

    def create():
        start.wait()
        try:
            tracked.client.create_registered_model(name)
            outcomes.append("created")
        except tracking.MlflowException as e:
            outcomes.append(e.error_code)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Counter(outcomes) == {"created": 1, "RESOURCE_ALREADY_EXISTS": 7}


def _two_at_once(*args, env, logs) -> list[subprocess.CompletedProcess]:
    """The same command as two processes started together; their output in files (a
    full pipe would stall one while the other waits for its claim)."""
    outs = [(open(logs / f"{i}.out", "w+"), open(logs / f"{i}.err", "w+")) for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kd_mlflow", *args], env={**os.environ, **env}, cwd=REPO, stdout=o, stderr=e
        )
        for o, e in outs
    ]
    done = []
    for p, (o, e) in zip(procs, outs, strict=True):
        p.wait(600)
        with o, e:
            o.seek(0), e.seek(0)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, o.read(), e.read()))
    return done


def test_two_identical_studies_at_once_make_one_run_per_identity(tracked, tmp_path):
    """Two `reproduce` of one study started together: every identity (config hash) of
    every role has one FINISHED run, the registry one version, and compare counts the
    KD student once; no claim is left behind."""
    args = ("reproduce", "--preset", "smoke", "--seeds", "0-1", "--epochs", "1", "--register-as", "{experiment}-kd")
    env = {**tracked.env, "KD_MLFLOW_CACHE": str(tmp_path / "cache")}
    procs = _two_at_once(*args, env=env, logs=tmp_path)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    finished = tracked.runs(statuses=("FINISHED",))
    hashes = Counter(r.data.tags[schema.CONFIG_HASH] for r in finished if schema.DUPLICATE_OF not in r.data.tags)
    assert hashes and max(hashes.values()) == 1, hashes
    roles = {r.data.tags.get(schema.ROLE) for r in finished}
    assert {"train", "ensemble", "student"} <= roles
    versions = tracked.client.search_model_versions(f"name = '{tracked.experiment}-kd'")
    assert len(versions) == 1
    assert "reusing finished run" in procs[0].stderr + procs[1].stderr
    doc = json.loads(invoke("compare", "--experiment", tracked.experiment, "--format", "json").stdout)
    (kd,) = [r for r in doc["summary"] if r["row"] == "KD students"]
    assert kd["n"] == 1
    assert not _claims(tracked.client)


def _smoke_hash(seed: int) -> str:
    recipe = config.preset("smoke")
    source, split = steps.load_data(recipe, None, steps.Execution())
    return steps._train_spec(seed, recipe, "smoke", source, split).config_hash


def test_a_claim_whose_heartbeat_stopped_is_taken_over_after_the_lease(tracked, tmp_path):
    """A claim planted by a holder on another machine that never beats again: the
    training waits one (short) lease for it, takes it over, finishes its run once, and
    removes both claims."""
    session = tracking.connect()
    stale = f"{claims.CLAIM_PREFIX}-{session.experiment_id}-{_smoke_hash(0)}-0"
    tracked.client.create_registered_model(stale, tags={"host": "elsewhere", "pid": "1", "beat": "7"})
    env = {**tracked.env, "KD_MLFLOW_CACHE": str(tmp_path / "cache"), claims.CLAIM_LEASE_ENV: LEASE}
    proc = run_cli("train", "--preset", "smoke", "--seed", "0", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "another process (elsewhere, pid 1) is making" in proc.stderr
    assert f"is stale (no heartbeat for {LEASE} s): taking it over" in proc.stderr
    assert len(tracked.runs(statuses=("FINISHED",))) == 1
    assert not _claims(tracked.client)


def test_a_claim_whose_holder_was_killed_is_taken_over_and_its_run_finishes_once(tracked, tmp_path):
    """A training SIGKILLed while it holds its claim (and its run is RUNNING): the same
    command again takes the claim over and the run finishes once."""
    env = {**os.environ, **tracked.env, "KD_MLFLOW_CACHE": str(tmp_path / "cache"), claims.CLAIM_LEASE_ENV: LEASE}
    args = [sys.executable, "-m", "kd_mlflow", "train", "--preset", "smoke", "--seed", "0", "--epochs", "40"]
    first = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not tracked.runs(statuses=("RUNNING",)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _claims(tracked.client), "the training holds no claim"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert [r.info.status for r in tracked.runs()] == ["RUNNING"]
    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"its process {first.pid} on this machine has exited): taking it over" in again.stderr
    statuses = Counter(r.info.status for r in tracked.runs())
    assert statuses["FINISHED"] == 1 and statuses["RUNNING"] == 0, statuses
    assert not _claims(tracked.client)


def test_a_run_is_findable_by_its_configuration_from_its_first_moment(tracked):
    """A process killed between creating its run and logging the header must leave a run
    the next launch finds (and continues), not an orphan RUNNING forever: the config hash
    goes with the run's creation."""
    session = tracking.connect(tracked.experiment)
    writer = tracking.RunWriter(session, None, "created", None, runs._identity(_SPEC))
    found = runs.find_resumable(session, _SPEC.config_hash)
    assert found is not None and found.run_id == writer.run_id
    writer.end("KILLED")


_SPEC = runs.RunSpec("created", "0123456789abcdef", {}, {}, ("digits", "", ""))


def _tiny_run(session) -> str:
    writer = tracking.RunWriter(session, None, "tiny")
    writer.log_model(torch.nn.Linear(4, 2), torch.zeros(2, 4))
    writer.end()
    return writer.run_id


def test_concurrent_registrations_of_one_run_make_one_version_without_a_warning(tracked, capfd):
    """Four registrations of one run under one name at once: one version, whose source
    is the run's LoggedModel (so MLflow prints no "has no artifacts at artifact path"
    warning)."""
    from kd_mlflow import runs

    session = tracking.connect()
    run_id = _tiny_run(session)
    capfd.readouterr()
    name = f"m-{uuid.uuid4().hex[:8]}"
    start, versions = threading.Barrier(4), []

    def register():
        start.wait()
        versions.append(runs.register(session, run_id, name))

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert versions == ["1"] * 4
    (version,) = tracked.client.search_model_versions(f"name = '{name}'")
    (output,) = tracked.client.get_run(run_id).outputs.model_outputs
    assert version.source == f"models:/{output.model_id}" and version.run_id == run_id
    assert "has no artifacts" not in capfd.readouterr().err
    assert tuple(mlflow.pytorch.load_model(f"models:/{name}/1")(torch.zeros(3, 4)).shape) == (3, 2)  # it loads
    assert not _claims(tracked.client)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_an_empty_registered_model_name_is_refused_before_anything_runs(command):
    res = invoke(command, "--register", "")
    assert res.exit_code == 2
    assert "--register" in res.output and "cannot be empty" in res.output
