"""The one recording path (:func:`kd_mlflow.runs.record`: a lone run is a wave of one),
on a real `mlflow server`, with bodies that train nothing: what a run is tagged with,
what is reused instead of run again, which checkpoints a run may continue from, and how
a wave ends when its body fails."""

from __future__ import annotations

import uuid

import pytest
import torch

from kd_mlflow import runs, schema, tracking


def _specs(tmp_path, seeds) -> list[runs.RunSpec]:
    study = uuid.uuid4().hex  # a configuration of its own per test
    return [
        runs.RunSpec(
            f"train-seed-{seed}",
            runs.digest(study, seed),
            {"seed": seed},
            {schema.ROLE: "train", schema.SEED: str(seed)},
            ("digits-train", tmp_path.as_uri(), "0" * 16),
        )
        for seed in seeds
    ]


def _body(calls: list):
    """A body that trains nothing: it says which runs it was given and with which
    checkpoint store, and hands back a tiny model per run."""

    def body(recordings, indices, store):
        calls.append((list(indices), store.directory if store else None))
        return [runs.Final({schema.FINAL_VAL_ACC: 50.0 + i}, torch.nn.Linear(4, 2), torch.zeros(2, 4)) for i in indices]

    return body


def test_a_lone_run_is_a_wave_of_one_and_only_a_packed_wave_is_tagged_packed(tracked, tmp_path):
    session = tracking.connect(tracked.experiment)
    specs, calls = _specs(tmp_path, (0, 1, 2)), []
    (lone,) = runs.record(session, specs[:1], _body(calls))
    run = session.client.get_run(lone.run_id)
    assert not lone.reused and run.info.status == "FINISHED"
    assert run.data.tags[schema.CONFIG_HASH] == specs[0].config_hash and schema.PACKED not in run.data.tags
    assert run.data.metrics[schema.FINAL_VAL_ACC] == 50.0
    wave = runs.record(session, specs, _body(calls), packed=True)
    assert calls == [([0], None), ([1, 2], None)]  # the finished configuration is not trained again
    assert wave[0] == runs.Outcome(lone.run_id, "train-seed-0", True)
    for out, spec in zip(wave[1:], specs[1:], strict=True):
        tags = session.client.get_run(out.run_id).data.tags
        assert not out.reused and tags[schema.PACKED] == "2" and tags[schema.CONFIG_HASH] == spec.config_hash


def test_a_lone_run_and_a_packed_wave_of_one_never_share_a_checkpoint(tracked, tmp_path):
    """A packed wave's checkpoint holds a packed network, a lone run's one network: the
    same configuration trained either way keeps its checkpoints in different places."""
    session = tracking.connect(tracked.experiment)
    specs, calls = _specs(tmp_path, (0,)), []
    root = tmp_path / "cache"
    runs.record(session, specs, _body(calls), checkpoint_root=root)
    runs.record(session, specs, _body(calls), packed=True, force=True, checkpoint_root=root)
    (_, lone), (_, packed) = calls
    assert lone != packed and {lone.parent, packed.parent} == {root / "checkpoints"}


def test_a_failing_body_ends_every_run_of_its_wave_failed(tracked, tmp_path):
    session = tracking.connect(tracked.experiment)
    specs = _specs(tmp_path, (0, 1))

    def body(recordings, indices, store):
        raise ValueError("planted")

    with pytest.raises(ValueError, match="planted"):
        runs.record(session, specs, body, packed=True)
    found = session.search(statuses=tracking.UNFINISHED)
    assert sorted(r.data.tags[schema.CONFIG_HASH] for r in found) == sorted(s.config_hash for s in specs)
    assert {r.info.status for r in found} == {"FAILED"}
    assert all("planted" in r.data.tags[schema.FAILURE] for r in found)
