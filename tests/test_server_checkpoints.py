"""Checkpoints that travel with their run, on a real `mlflow server`: what a rerun on
another machine fetches (the newest that verifies and belongs to its runs; a local one
that is newer wins), and the cadence of uploads."""

from __future__ import annotations

import io

import pytest

from kd_mlflow import tracking
from kd_mlflow.checkpoint import SLOTS, Cadence, CheckpointStore, cadence
from kd_mlflow.config import ConfigError


def _store(session, directory, **kw):
    return CheckpointStore(directory, log=io.StringIO(), remote=tracking.ServerCheckpoints(session), **kw)


@pytest.fixture
def trained(tracked, tmp_path):
    """A run whose epochs 1-3 were checkpointed on machine A (uploaded every epoch)."""
    session = tracking.connect(tracked.experiment)
    run_id = session.client.create_run(session.experiment_id).info.run_id
    owners = {"hash": run_id}
    a = _store(session, tmp_path / "a")
    a.bind(owners)
    for epoch in (1, 2, 3):
        a.save({"epoch": epoch, "weights": [float(epoch)]})
    return session, owners, a


def test_another_machine_fetches_the_newest_checkpoint_and_the_server_keeps_two(trained, tmp_path):
    session, owners, _ = trained
    assert {p.split("/")[-1] for p in session.artifact_paths(owners["hash"], "checkpoint")} == set(SLOTS)
    b = _store(session, tmp_path / "b")
    assert b.pull(owners)
    b.bind(owners)
    assert b.load_latest()["epoch"] == 3


def test_a_torn_upload_is_skipped_for_the_slot_before_it(trained, tmp_path):
    """A kill mid-upload leaves a cut file in the slot being written: its checksum fails,
    and the other slot (one epoch older) is continued from."""
    session, owners, a = trained
    newest = a._files()[-1]
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(newest.read_bytes()[:-100])
    tracking.ServerCheckpoints(session).upload(owners["hash"], cut, SLOTS[0])  # epoch 3 went to slot 0
    b = _store(session, tmp_path / "b")
    assert b.pull(owners)
    b.bind(owners)
    assert b.load_latest()["epoch"] == 2
    assert "checksum mismatch" in b.log.getvalue()


def test_a_checkpoint_of_other_runs_is_refused(trained, tmp_path):
    session, owners, _ = trained
    b = _store(session, tmp_path / "b")
    assert not b.pull({"hash": owners["hash"], "other": "another-run"})
    assert "belongs to run(s)" in b.log.getvalue() and not b.exists()


def test_a_newer_local_checkpoint_is_kept(trained, tmp_path):
    _, owners, a = trained
    a.every = Cadence(0)  # uploads off: epoch 4 is on local disk only
    a.save({"epoch": 4, "weights": [4.0]})
    assert a.pull(owners)
    assert "fetched" not in a.log.getvalue() and a.load_latest()["epoch"] == 4


def test_the_finished_runs_checkpoints_leave_the_server(trained):
    session, owners, a = trained
    a.finish()
    assert session.artifact_paths(owners["hash"], "checkpoint") == set() and not a.exists()


@pytest.mark.parametrize(
    ("text", "due_at"),
    [("", [1, 2, 3]), ("1", [1, 2, 3]), ("2", [2]), ("0", [])],
)
def test_cadence_in_epochs(text, due_at):
    every = cadence(text)
    assert [e for e in (1, 2, 3) if every.due(e, since_last=0.0)] == due_at


def test_cadence_in_minutes():
    every = cadence("1.5m")
    assert not every.due(1, since_last=89.0) and every.due(2, since_last=90.0)


@pytest.mark.parametrize("text", ["often", "-1", "0m", "1.5", "inf", "nanm"])
def test_a_bad_cadence_names_itself(text):
    with pytest.raises(ConfigError, match="KD_MLFLOW_CHECKPOINT_EVERY"):
        cadence(text)
