"""`train` end to end: through `mlflow run` against a real server, and against the
embedded default store; what a run records; idempotent reruns."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import mlflow_run, run_cli
from packaging.requirements import Requirement

from kd_mlflow import data, schema

pytestmark = pytest.mark.e2e  # real processes, a real server or store


def _test_acc_of_logged_model(run_id: str) -> float:
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    src = data.load("digits")
    with torch.no_grad():
        return 100.0 * (model(src.test_x).argmax(1) == src.test_y).sum().item() / len(src.test_y)


def test_mlflow_run_train_gives_one_complete_run(tracked):
    # booleans as `mlflow run` passes them (--augment true): one test pass at the end
    params = {"seed": 3, "preset": "smoke", "epochs": 3, "augment": "true", "test_each_epoch": "false"}
    proc = mlflow_run("train", params, {**os.environ, **tracked.env}, tracked.experiment, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = tracked.runs()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "train-seed-3"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert (p["seed"], p["preset"], p["epochs"], p["model"], p["dataset"]) == (
        "3",
        "smoke",
        "3",
        "resnet18-cifar",
        "digits",
    )
    for key in ("split_seed", "order_seed", "split_digest", "optimizer", "lr", "batch_size", "width"):
        assert key in p, key
    assert t[schema.ROLE] == "train" and t[schema.SPLIT_DIGEST] == p["split_digest"]
    # as typed under `mlflow run` (the same values as the recipe's True and False)
    assert (p["augment"], p["test_each_epoch"]) == ("true", "false")
    assert not any(k.startswith("resolved.") for k in p), p
    for key in schema.EPOCH_METRICS:
        steps = [h.step for h in tracked.client.get_metric_history(run.info.run_id, key)]
        expected = [] if key == "test_acc" else [1, 2, 3]  # test_each_epoch=false: no test curve
        assert sorted(steps) == expected, (key, steps)  # once per epoch, step = epoch
    best = int(m[schema.BEST_EPOCH])
    val_hist = {h.step: h.value for h in tracked.client.get_metric_history(run.info.run_id, "val_acc")}
    assert m[schema.FINAL_VAL_ACC] == max(val_hist.values()) == val_hist[best]
    assert run.inputs.dataset_inputs[0].dataset.digest == p["split_digest"]
    assert abs(_test_acc_of_logged_model(run.info.run_id) - m[schema.FINAL_TEST_ACC]) < 1e-6

    # The weights load without pickle code.
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="weights/model.pt")
    assert "net.fc.weight" in torch.load(path, weights_only=True)
    # The model's environment: this one's torch, torchvision and MLflow, pinned.
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model/requirements.txt")
    pins = {Requirement(line).name: str(Requirement(line).specifier) for line in Path(path).read_text().split()}
    assert pins == {n: "==" + metadata.version(n).split("+")[0] for n in ("mlflow", "torch", "torchvision")}

    # Same configuration again through `mlflow run`: nothing trains, and the extra run
    # MLflow insists on creating only points at the result.
    proc = mlflow_run("train", params, {**os.environ, **tracked.env}, tracked.experiment, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing finished run " + run.info.run_id in proc.stderr
    runs = tracked.runs()
    assert len(runs) == 2
    extra = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert extra.data.tags[schema.DUPLICATE_OF] == run.info.run_id
    assert not any(k.startswith("final_") for k in extra.data.metrics)


def test_embedded_default_store_and_idempotent_rerun(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["KD_MLFLOW_CACHE"] = str(cache_dir)
    first = run_cli("train", "--seed", 0, "--preset", "smoke", env=env, cwd=tmp_path, exact_env=True)
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = first.stdout.strip().splitlines()[-1]
    assert (tmp_path / "mlflow.db").exists()
    second = run_cli("train", "--seed", 0, "--preset", "smoke", env=env, cwd=tmp_path, exact_env=True)
    assert second.returncode == 0 and second.stdout.strip().splitlines()[-1] == run_id
    assert "epoch 1/" not in second.stderr  # nothing trained
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.get_experiment_by_name("mysteries")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = mlflow.search_runs([exp.experiment_id], output_format="list")
        assert [r.info.run_id for r in runs] == [run_id]
    finally:
        mlflow.set_tracking_uri(None)
    forced = run_cli("train", "--seed", 0, "--preset", "smoke", "--force", env=env, cwd=tmp_path, exact_env=True)
    assert forced.returncode == 0 and forced.stdout.strip().splitlines()[-1] != run_id
