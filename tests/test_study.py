"""A `smoke` study through `reproduce` against a real server: lineage, models that load
back, `compare` numbers traceable to runs, and a rerun that trains nothing."""

from __future__ import annotations

import json
import types
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import invoke, run_cli

from kd_mlflow import data, schema, steps
from kd_mlflow import study as study_mod


@pytest.fixture(scope="module")
def study(smoke_study):
    """The session's smoke study (conftest.smoke_study: `reproduce --seeds 0-1` into
    study-smoke), its runs read back as this file's tests read them."""
    client = mlflow.MlflowClient(smoke_study.server.uri)
    exp = client.get_experiment(smoke_study.experiment_id)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    mlflow.set_tracking_uri(smoke_study.server.uri)
    yield {
        "env": smoke_study.env,
        "proc": smoke_study.proc,
        "client": client,
        "exp": exp,
        "by_name": {r.info.run_name: r for r in runs},
    }
    mlflow.set_tracking_uri(None)


def test_every_step_finished_with_its_lineage(study):
    r = study["by_name"]
    expected = {
        "train-seed-0",
        "train-seed-1",
        "ensemble-seeds-0-1",
        "kd-seed-100",
        "sd-t0-s10",
        "sd-t1-s11",
        "sd-ensemble-seeds-10-11",
        "study-smoke-digits-seeds=0-1",
    }
    assert set(r) == expected
    assert all(run.info.status == "FINISHED" for run in r.values())
    name = "study-smoke-digits-seeds=0-1"  # seeds other than the default 0-4: in the name
    parent = r[name].info.run_id
    assert all(run.data.tags.get("mlflow.parentRunId") == parent for n, run in r.items() if n != name)

    t0, t1, ens = r["train-seed-0"], r["train-seed-1"], r["ensemble-seeds-0-1"]
    assert ens.data.tags[schema.MEMBER_RUN_IDS] == f"{t0.info.run_id},{t1.info.run_id}"
    assert ens.data.tags[schema.MEMBER_SEEDS] == "0,1" and ens.data.tags[schema.MEMBER_ROLE] == "train"
    kd = r["kd-seed-100"].data.tags
    assert (kd[schema.METHOD], kd[schema.TEACHER_RUN_ID], kd[schema.TEACHER_SEEDS], kd[schema.GENERATION]) == (
        "kd",
        ens.info.run_id,
        "0,1",
        "1",
    )
    sd = r["sd-t0-s10"].data
    assert (sd.tags[schema.METHOD], sd.tags[schema.TEACHER_RUN_ID], sd.params["temperature"], sd.params["alpha"]) == (
        "sd",
        t0.info.run_id,
        "1.0",
        "1.0",
    )
    sde = r["sd-ensemble-seeds-10-11"].data.tags
    assert sde[schema.MEMBER_ROLE] == "student" and sde[schema.MEMBER_SEEDS] == "10,11"
    assert len({run.data.tags[schema.SPLIT_DIGEST] for run in r.values()}) == 1
    assert study["exp"].tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_ensemble_model_loads_and_reproduces_its_test_accuracy(study):
    ens = study["by_name"]["ensemble-seeds-0-1"]
    model = mlflow.pytorch.load_model(f"runs:/{ens.info.run_id}/model")
    src = data.load("digits")
    with torch.no_grad():
        acc = 100.0 * (model(src.test_x).argmax(1) == src.test_y).float().mean().item()
    assert acc == pytest.approx(ens.data.metrics[schema.FINAL_TEST_ACC], abs=1e-4)


def test_parent_run_holds_tables_and_plots(study):
    parent = study["by_name"]["study-smoke-digits-seeds=0-1"].info.run_id
    names = {a.path for a in study["client"].list_artifacts(parent)}
    assert {
        "tables.md",
        "tables.json",
        "tables.csv",
        "learning_curves.png",
        "accuracy_by_method.png",
        "gains.png",
        "steps.json",
    } <= names
    assert {"ensemble_gain_lo", "ensemble_gain_hi", "kd_gain", "sd_gain_mean"} <= set(
        study["by_name"]["study-smoke-digits-seeds=0-1"].data.metrics
    )
    assert "| seed | validation accuracy | test accuracy |" in study["proc"].stdout


def _compare(study, monkeypatch, *args):
    """`kd-mlflow compare` on the study's experiment, in this process."""
    for k, v in study["env"].items():
        monkeypatch.setenv(k, v)
    res = invoke("compare", "--experiment", "study-smoke", *args)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_compare_numbers_are_the_metrics_of_the_runs_they_name(study, monkeypatch):
    tables = json.loads(_compare(study, monkeypatch, "--format", "json"))
    assert set(tables) >= {"seeds", "ensembles", "kd", "self_distillation", "sd_ensembles", "summary"}
    client, checked = study["client"], 0
    for key, val_col, test_col in (
        ("seeds", "val_acc", "test_acc"),
        ("ensembles", "val_acc", "test_acc"),
        ("kd", "val_acc", "test_acc"),
        ("sd_ensembles", "val_acc", "test_acc"),
        ("self_distillation", "student_val_acc", "student_test_acc"),
    ):
        assert tables[key], key
        for row in tables[key]:
            m = client.get_run(row["run_id"]).data.metrics
            assert row[val_col] == m[schema.FINAL_VAL_ACC] and row[test_col] == m[schema.FINAL_TEST_ACC]
            checked += 1
    for row in tables["self_distillation"]:
        m = client.get_run(row["teacher_run_id"]).data.metrics
        assert row["teacher_test_acc"] == m[schema.FINAL_TEST_ACC]
    assert checked == 2 + 1 + 1 + 1 + 2


def test_a_second_reproduce_trains_nothing(study):
    before = len(study["client"].search_runs([study["exp"].experiment_id], max_results=100))
    proc = run_cli("reproduce", "--experiment", "study-smoke", "--preset", "smoke", "--seeds", "0-1", env=study["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1/" not in proc.stderr and "0 step(s) ran, 7 reused" in proc.stderr
    after = len(study["client"].search_runs([study["exp"].experiment_id], max_results=100))
    assert after == before


def test_a_rerun_with_jobs_runs_each_step_as_a_process_that_finds_its_run(study):
    """`--jobs 2` runs every step as a `kd-mlflow _step` process, the step serialised
    once: each finds the run this study made in one process, so nothing trains."""
    args = ("reproduce", "--experiment", "study-smoke", "--preset", "smoke", "--seeds", "0-1", "--jobs", "2")
    proc = run_cli(*args, env=study["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 step(s) ran, 7 reused" in proc.stderr


def test_compare_refuses_a_missing_experiment_without_creating_it(study, monkeypatch):
    for k, v in study["env"].items():
        monkeypatch.setenv(k, v)
    res = invoke("compare", "--experiment", "no-such-study")
    assert res.exit_code == 2 and "no-such-study" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert study["client"].get_experiment_by_name("no-such-study") is None


# --- issue 14: predictions as artifacts, every gain with its uncertainty ----------


def _predictions(client, run_id):
    from kd_mlflow import predictions

    return predictions.load(client.download_artifacts(run_id, schema.PREDICTIONS_PATH))


def test_every_run_logs_its_predictions_and_the_ensemble_is_their_average(study):
    client, r = study["client"], study["by_name"]
    for name, run in r.items():
        if name.startswith("study-"):
            continue
        p = _predictions(client, run.info.run_id)
        assert p.probs("test").dtype.name == "float16" and p.probs_val.shape[0] == int(run.data.params["n_val"])
        assert 100.0 * p.correct("test").mean() == pytest.approx(run.data.metrics[schema.FINAL_TEST_ACC], abs=1e-9)
    ens = r["ensemble-seeds-0-1"]
    members = [_predictions(client, rid) for rid in ens.data.tags[schema.MEMBER_RUN_IDS].split(",")]
    mean = sum(m.probs("test").astype("float64") for m in members) / len(members)
    acc = 100.0 * (mean.argmax(1) == members[0].labels("test")).mean()
    assert acc == pytest.approx(ens.data.metrics[schema.FINAL_TEST_ACC], abs=1e-9)


def test_compare_intervals_contain_their_gains_and_come_from_the_artifacts(study, monkeypatch):
    from kd_mlflow import stats

    doc = json.loads(_compare(study, monkeypatch, "--format", "json"))
    gains = {g["gain"]: g for g in doc["gains"]}
    assert {
        "ensemble - mean single",
        "KD - mean single",
        "SD - teacher (mean over pairs)",
        "SD ensemble - ensemble",
    } <= set(gains)
    for g in doc["gains"]:
        assert g["lo"] <= g["estimate"] <= g["hi"], g
    client, r = study["client"], study["by_name"]
    singles = [_predictions(client, r[f"train-seed-{s}"].info.run_id).correct("test") for s in (0, 1)]
    ens = _predictions(client, r["ensemble-seeds-0-1"].info.run_id).correct("test")
    again = stats.paired_bootstrap(singles, ens)
    g = gains["ensemble - mean single"]
    assert (g["lo"], g["hi"]) == (again.lo, again.hi)
    # The estimate is the runs' logged metrics' (the summary's too): the artifacts agree.
    assert g["estimate"] == pytest.approx(again.estimate, abs=1e-9)
    sd = [g for g in doc["gains"] if g["gain"].startswith("SD student")]
    assert len(sd) == 2 and all(0 <= g["p_value"] <= 1 for g in sd)
    assert any(m["figure"].startswith("members: images where") for m in doc["mechanism"])
    md = _compare(study, monkeypatch)
    assert "### Gains with 95% intervals" in md and " [" in md.split("### Gains")[1]


def test_the_parent_names_the_runs_its_figures_cover(study):
    """Issue 29, finding 3: the parent's kd_gain (its own KD student's) silently differed
    from compare's once another KD student joined the group; its tag names the runs its
    summary metrics are of: every step that has a result, none other."""
    r = study["by_name"]
    parent = r["study-smoke-digits-seeds=0-1"]
    covered = parent.data.tags[schema.SUMMARY_RUN_IDS].split(",")
    assert covered == sorted(run.info.run_id for name, run in r.items() if not name.startswith("study-"))


def test_compare_csv_is_one_file_per_table_or_the_one_named(study, monkeypatch, tmp_path):
    """``--format csv --output DIR``: DIR/<table>.csv for every table; ``--table NAME``
    prints that one alone; with neither, the per-run table (each run once)."""
    from kd_mlflow import tables

    _compare(study, monkeypatch, "--format", "csv", "--no-intervals", "--output", str(tmp_path / "csv"))
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == sorted(f"{n}.csv" for n in tables.CSV_TABLES)
    summary = _compare(study, monkeypatch, "--format", "csv", "--no-intervals", "--table", "summary")
    assert summary == (tmp_path / "csv" / "summary.csv").read_text() + "\n"  # (echo ends the text with a line)
    per_run = _compare(study, monkeypatch, "--format", "csv", "--no-intervals")
    assert per_run == (tmp_path / "csv" / "runs.csv").read_text() + "\n"
    ids = [line.split(",")[0] for line in per_run.splitlines()[1:] if line]
    named = {r.info.run_id for n, r in study["by_name"].items() if not n.startswith("study-")}
    assert sorted(ids) == sorted(named)  # every result once; the study's parent is none


# --- a step serialised once, run by one entry (issue 30) -------------------------------

STEPS = [
    study_mod.TrainStep(3, network=(("model", "resnet8"), ("width", 64))),
    study_mod.DistillStep("a" * 32, 100, "kd", "0,1", (("temperature", 2.0), ("alpha", 0.5)), "-t", model="resnet8"),
    study_mod.EnsembleStep(("a" * 32, "b" * 32), (0, 1), "train", "logit"),
    study_mod.JointStep((0, 1, 2)),
]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: type(s).__name__)
def test_a_step_serialised_once_reads_back_as_itself_with_all_it_needs(step):
    """What `kd-mlflow _step` reads (a --jobs process, a Ray task) is the step the study
    planned, with its plan's preset, overrides (tuples too) and data, the execution
    settings and the parent run."""
    overrides = {"mean": (0.25, 0.5, 0.75), "milestones": (), "augment": True, "lr": 1e-3}
    plan = types.SimpleNamespace(preset="smoke", overrides=overrides, data_dir="/data")
    ex = steps.Execution(device="cpu", deterministic=True, force=True, cache_dir=Path("/tmp/cache"))
    ctx = study_mod.Context(plan, ex, "f" * 32)
    (again,), where = study_mod.Context.from_json(ctx.to_json([step]))
    assert again == step and again.name == step.name
    assert (where.plan.preset, where.plan.overrides, where.plan.data_dir) == ("smoke", overrides, "/data")
    assert (where.ex, where.parent) == (ex, "f" * 32)


@pytest.mark.parametrize("job", ["not json", "{}", "[1]", '{"steps": [{"kind": "Popen"}]}'])
def test_the_step_command_refuses_what_kd_mlflow_did_not_serialise(job):
    res = invoke("_step", job)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "not a step kd-mlflow serialised" in lines[0], res.stderr


def test_the_step_command_is_not_offered_to_users():
    """It is the executors' entry: neither the list of commands nor --help shows it."""
    res = invoke()
    assert res.exit_code == 2 and "give a command: backfill, compare," in res.stderr, res.stderr
    assert "_step" not in res.output
