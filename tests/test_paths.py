"""The paths a user types, against a real `mlflow server`: `mlflow run . -e main` (the
README's line), a rerun, a variant of the study, overrides, a logit ensemble, `compare`
as a command and as `mlflow run -e compare`, the Model Registry, and runs that land in
MLflow's Default experiment."""

from __future__ import annotations

import json
import os
import uuid

import mlflow
import pytest
import torch
from conftest import invoke, mlflow_run, run_cli

from kd_mlflow import data, schema

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def paths(server, cache_dir):
    name = f"paths-{uuid.uuid4().hex[:8]}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    }
    env.update(MLFLOW_TRACKING_URI=server.uri, KD_MLFLOW_CACHE=str(cache_dir))
    client = mlflow.MlflowClient(server.uri)
    out = {"env": env, "client": client, "name": name}
    out["main"] = mlflow_run("main", {"preset": "smoke"}, env, name)
    assert out["main"].returncode == 0, out["main"].stderr[-3000:]
    exp = client.get_experiment_by_name(name)
    out["exp"] = exp
    out["first"] = client.search_runs([exp.experiment_id], max_results=1000)
    out["again"] = mlflow_run("main", {"preset": "smoke"}, env, name)
    assert out["again"].returncode == 0, out["again"].stderr[-3000:]
    out["second"] = client.search_runs([exp.experiment_id], max_results=1000)
    return out


def _by_role(runs):
    return [r for r in runs if r.data.tags.get(schema.ROLE)]


def test_mlflow_run_main_is_the_parent_of_every_step(paths):
    runs = paths["first"]
    parents = [r for r in runs if r.data.tags.get(schema.STUDY) == "true"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "study-smoke-digits" and schema.ROLE not in parent.data.tags
    assert parent.data.tags.get("mlflow.project.entryPoint") == "main"  # the run MLflow made
    steps = _by_role(runs)
    assert len(steps) == 13 and len(runs) == 14
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in steps)
    assert all(r.info.status == "FINISHED" for r in runs)
    with open(paths["client"].download_artifacts(parent.info.run_id, "tables.json")) as f:
        tables = json.load(f)
    assert sorted(r["seed"] for r in tables["seeds"]) == [0, 1, 2, 3, 4]
    assert len(tables["self_distillation"]) == 5 and all(r["teacher_test_acc"] for r in tables["self_distillation"])
    assert tables["notes"] == []
    # The summary is on the parent as metrics: MLflow lists it as a training run.
    m = parent.data.metrics
    single = [r["test_acc"] for r in tables["seeds"]]
    assert m["single_test_acc_mean"] == pytest.approx(sum(single) / 5)
    assert m["ensemble_gain"] == pytest.approx(tables["ensembles"][0]["test_acc"] - sum(single) / 5)
    assert {"kd_gain", "sd_gain_mean", "sd_ensemble_gain", "single_test_acc_std"} <= set(m)
    assert "[step 13/13]" in paths["main"].stderr


def test_running_main_again_reuses_the_steps(paths):
    first = {r.info.run_id for r in _by_role(paths["first"])}
    second = {r.info.run_id for r in _by_role(paths["second"])}
    assert first == second, "a step was trained again"
    assert "0 step(s) ran, 13 reused" in paths["again"].stderr
    # One parent per study: the run MLflow made for the rerun only points at it.
    parents = [r for r in paths["second"] if r.data.tags.get(schema.STUDY) == "true"]
    assert len(parents) == 1 and parents[0].data.metrics.get("single_test_acc_mean")
    pointers = [r for r in paths["second"] if r.data.tags.get(schema.DUPLICATE_OF) == parents[0].info.run_id]
    assert len(pointers) == 1 and pointers[0].data.tags.get("mlflow.project.entryPoint") == "main"
    assert not [r for r in paths["second"] if r.data.tags.get("mlflow.parentRunId") == pointers[0].info.run_id]
    assert f"already has a parent run, {parents[0].info.run_id}" in paths["again"].stderr


def test_the_kd_student_is_registered_once_and_loads_as_champion(paths):
    name = f"{paths['name']}-kd-student"
    client = paths["client"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, "a rerun added a version"
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "kd-seed-100" and run.data.tags[schema.METHOD] == "kd"
    assert mv.tags["kd.study_run_id"] in {r.info.run_id for r in paths["second"]}
    mlflow.set_tracking_uri(paths["env"]["MLFLOW_TRACKING_URI"])
    try:
        model = mlflow.pytorch.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    src = data.load("digits")
    with torch.no_grad():
        acc = 100.0 * (model(src.test_x).argmax(1) == src.test_y).sum().item() / len(src.test_y)
    assert acc == pytest.approx(run.data.metrics[schema.FINAL_TEST_ACC], abs=1e-9)


@pytest.fixture(scope="module")
def mixed(paths):
    """The same experiment, then a variant of the study and runs with other recipes."""
    env, name = {**paths["env"], "MLFLOW_EXPERIMENT_NAME": paths["name"]}, paths["name"]
    out = {}
    out["t2"] = run_cli("reproduce", "--preset", "smoke", "--temperature", "2", "--no-register", env=env)
    assert out["t2"].returncode == 0, out["t2"].stderr[-3000:]
    short = run_cli("train", "--seed", "0", "--preset", "smoke", "--epochs", "1", env=env)
    assert short.returncode == 0, short.stderr[-3000:]
    out["short"] = short.stdout.strip().splitlines()[-1]
    logit = run_cli("ensemble", "--seeds", "0-4", "--preset", "smoke", "--combine", "logit", env=env)
    assert logit.returncode == 0, logit.stderr[-3000:]
    out["logit"] = logit.stdout.strip().splitlines()[-1]
    with pytest.MonkeyPatch.context() as mp:  # compare only reads: in this process (as a command: below)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "KD_MLFLOW_CACHE"):
            mp.setenv(key, env[key])
        cmp = invoke("compare", "--format", "json")
    assert cmp.exit_code == 0, cmp.output[-3000:]
    out["json"] = json.loads(cmp.stdout)
    out["runs"] = {
        r.info.run_id: r for r in paths["client"].search_runs([paths["exp"].experiment_id], max_results=1000)
    }
    out["name"] = name
    return out


def test_a_student_setting_retrains_students_and_no_teacher(mixed):
    err = mixed["t2"].stderr
    assert "7 step(s) ran, 6 reused" in err, err[-2000:]
    assert "reusing finished run" in err and "train-seed-0" in err.split("reusing finished run")[1].splitlines()[0]


def test_every_group_holds_only_its_own_runs(mixed):
    doc, runs = mixed["json"], mixed["runs"]
    groups = {r["group"] for section in ("seeds", "ensembles", "kd", "self_distillation") for r in doc[section]}
    assert {"smoke", "smoke · epochs=1", "smoke · students: temperature=2.0", "smoke · ensemble: logit"} <= groups
    for section in ("seeds", "ensembles", "kd", "self_distillation", "sd_ensembles"):
        for row in doc[section]:
            run = runs[row["run_id"]]
            label = row["group"]
            # Each number is the metric of the run it names.
            acc = row.get("test_acc", row.get("student_test_acc"))
            assert acc == run.data.metrics[schema.FINAL_TEST_ACC]
            if section == "seeds":
                assert (row["run_id"] == mixed["short"]) == (label == "smoke · epochs=1")
            if section in ("ensembles", "sd_ensembles"):
                assert (run.data.params["combine"] == "logit") == ("ensemble: logit" in label)
            if section in ("kd", "self_distillation"):
                assert (run.data.params["temperature"] == "2.0") == ("temperature=2.0" in label)
    short = [r for r in doc["seeds"] if r["group"] == "smoke · epochs=1"]
    assert [r["run_id"] for r in short] == [mixed["short"]] and short[0]["recipe"]["epochs"] == "1"
    main = [r for r in doc["summary"] if r["group"] == "smoke" and r["row"] == "single models"]
    assert main[0]["n"] == 5


def test_mlflow_run_compare_logs_the_tables_on_its_own_run(mixed, paths):
    proc = mlflow_run("compare", {"experiment": mixed["name"]}, paths["env"], mixed["name"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = paths["client"]
    runs = client.search_runs([paths["exp"].experiment_id], f"tags.`{schema.COMPARE}` = 'true'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    names = {f.path for f in client.list_artifacts(runs[0].info.run_id)}
    assert {"tables.md", "tables.json", "tables.csv", "accuracy_by_method.png"} <= names
    assert schema.ROLE not in runs[0].data.tags


def test_a_run_in_the_default_experiment_says_so_and_compare_names_it(paths, tmp_path):
    proc = mlflow_run("train", {"seed": 2, "preset": "smoke", "epochs": 1}, paths["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Default experiment" in proc.stderr and "kd-mlflow compare --experiment Default" in proc.stderr
    empty = f"empty-{uuid.uuid4().hex[:6]}"
    paths["client"].create_experiment(empty)
    cmp = run_cli("compare", "--experiment", empty, env=paths["env"])
    assert cmp.returncode == 0 and "no finished runs" in cmp.stdout
    assert "Default" in cmp.stderr and paths["name"] in cmp.stderr


def test_links_open_the_training_view(paths):
    err = paths["main"].stderr
    links = [w for line in err.splitlines() for w in line.split() if w.startswith("http")]
    assert links and all("workflowType=machine_learning" in link for link in links)
    assert any("compare-runs" in link for link in links)
