"""Issue 18, "tables that cannot contradict themselves", on a real server: one reading of
a run (runs.record_of), groups by lineage, and accuracy from artifacts that is the
logged accuracy.

One experiment, built once in this process (steps and study, no subprocess): the README's
smoke study on seeds 0-1, then `train --seed 2 --epochs 1` and a student of it, a student
that overrides its teacher's lr, a run trained as `mlflow run -P augment=true` leaves
it, and two ensembles of members from different groups logged as `ensemble --members`
logs them. The KD student's predictions get a planted float16 tie.
"""

from __future__ import annotations

import ast
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Param

from kd_mlflow import compare, config, report, runs, schema, steps, study, tracking

pytestmark = pytest.mark.e2e
SMOKE = config.preset("smoke")


def _mixed_ensemble(client, exp_id, members, tagged: bool) -> str:
    """An ensemble of ``members`` (train runs of different groups) as `ensemble --members`
    logs one: with --allow-mixed it is tagged kd.mixed; before that flag existed, not."""
    run = client.create_run(exp_id, run_name="ensemble-mixed")
    rid = run.info.run_id
    tags = {
        schema.ROLE: "ensemble",
        schema.PRESET: "smoke",
        schema.DATASET: "digits",
        schema.MEMBER_ROLE: "train",
        schema.MEMBER_RUN_IDS: ",".join(m.run_id for m in members),
        schema.MEMBER_SEEDS: ",".join(str(m.seed) for m in members),
        schema.GROUP: "mixed-" + rid[:6],
        schema.GROUP_LABEL: "smoke",
        schema.CONFIG_HASH: rid,
        **({schema.MIXED: "true"} if tagged else {}),
    }
    for key, value in tags.items():
        client.set_tag(rid, key, value)
    client.log_param(rid, "combine", "prob")
    client.log_metric(rid, schema.FINAL_VAL_ACC, 91.5)
    client.log_metric(rid, schema.FINAL_TEST_ACC, 90.25)
    client.set_terminated(rid)
    return rid


def _plant_tie(session, rec) -> int:
    """Rewrite the run's predictions so that, on one test image it gets right (label
    y > 0), class 0 and y tie in float16 while y is ahead at full precision: the
    argmax of the float16 copy says 0, the stored class (the model's) says y."""
    p = runs.predictions_of(session, rec)
    probs, pred, labels = p.probs_test.astype(np.float64), p.top1("test").copy(), p.labels("test")
    i = int(np.flatnonzero((pred == labels) & (labels > 0))[0])
    probs[i] = 0.0
    probs[i, 0], probs[i, labels[i]] = 0.5 - 1e-5, 0.5 + 1e-5
    runs.add_predictions(
        session,
        rec,
        p.probs_val.astype(np.float64),
        probs,
        p.labels_val,
        labels,
        pred_val=p.top1("val"),
        pred_test=pred,
    )
    return i


def _log_predictions_off_the_logged_accuracy(session, rec) -> None:
    """The run's predictions logged again with one right class made wrong: accuracy from
    the artifact is no longer the run's logged one."""
    p = runs.predictions_of(session, rec)
    pred, labels = p.top1("test").copy(), p.labels("test")
    i = int(np.flatnonzero(pred == labels)[0])
    pred[i] = (labels[i] + 1) % p.num_classes
    runs.add_predictions(
        session, rec, p.probs_val, p.probs_test, p.labels_val, labels, pred_val=p.top1("val"), pred_test=pred
    )


@pytest.fixture(scope="module")
def lab(server, cache_dir):
    name = f"one-reading-{uuid.uuid4().hex[:8]}"
    ex = steps.Execution(cache_dir=cache_dir)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.setenv("KD_MLFLOW_CACHE", str(cache_dir))
        mlflow.set_tracking_uri(server.uri)
        done = study.reproduce(study.Plan("smoke", SMOKE, {}, [0, 1]), experiment=name, ex=ex)
        session = tracking.connect(name)
        where = {"session": session, "ex": ex}
        t2 = steps.train(2, SMOKE.replace(epochs=1), "smoke", **where).run_id
        s12 = steps.distill(t2, 12, overrides={"epochs": 2}, **where).run_id
        s20 = steps.distill(done.runs["train-seed-0"], 20, overrides={"lr": 0.005}, **where).run_id
        # `mlflow run . -e train -P seed=3 -P preset=smoke -P augment=true`: MLflow logs the
        # parameters as typed, then the command adopts its run.
        typed = session.client.create_run(session.experiment_id, run_name="mlflow-run").info.run_id
        session.client.log_batch(typed, params=[Param("seed", "3"), Param("preset", "smoke"), Param("augment", "true")])
        mp.setenv("MLFLOW_RUN_ID", typed)
        t3 = steps.train(3, SMOKE.replace(augment=True, epochs=1), "smoke", ex=ex).run_id
        mp.delenv("MLFLOW_RUN_ID")
        members = [runs.get(session, rid, "run") for rid in (done.runs["train-seed-0"], t2)]
        mixed = _mixed_ensemble(session.client, session.experiment_id, members, tagged=True)
        # Other members: an ensemble of the same members is the same identity, counted once.
        others = [runs.get(session, rid, "run") for rid in (done.runs["train-seed-1"], t2)]
        untagged = _mixed_ensemble(session.client, session.experiment_id, others, tagged=False)
        yield {
            "session": session,
            "study": done,
            "t2": t2,
            "s12": s12,
            "s20": s20,
            "t3": t3,
            "mixed": mixed,
            "untagged": untagged,
            "tables": compare.build_tables(runs.results_frame(session)),
            "parent": session.client.get_run(done.parent_run_id),
        }
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def planted(lab):
    """The tables with intervals, after a float16 tie is planted in the KD student's
    predictions, the SD student 10's are replaced by ones whose accuracy is not its logged one, and train
    seed 1 looks like a run made before runs logged predictions (computed from its
    weights by backfill)."""
    session, r = lab["session"], lab["study"].runs
    kd = runs.get(session, r["kd-seed-100"], "run")
    tie = _plant_tie(session, kd)
    _log_predictions_off_the_logged_accuracy(session, runs.get(session, r["sd-t0-s10"], "run"))
    session.client.delete_tag(r["train-seed-1"], schema.PREDICTIONS)
    tables = compare.build_tables(runs.results_frame(session))
    before = report.predictions_for(session, compare.run_ids(tables))
    assert r["train-seed-1"] not in before  # a read computes nothing
    added = report.backfill_runs(session, compare.run_ids(tables))
    assert f"run {r['train-seed-1']} (train-seed-1): added predictions" in added
    preds = report.predictions_for(session, compare.run_ids(tables))
    return {"kd": kd, "tie": tie, "tables": [compare.with_intervals(t, preds) for t in tables]}


def _listed(t) -> set:
    return {
        *t.seeds["run_id"],
        *t.ensembles["run_id"],
        *t.kd["run_id"],
        *t.self_distillation["run_id"],
        *t.sd_ensembles["run_id"],
    }


def _table_of(tables, run_id):
    (t,) = [t for t in tables if run_id in _listed(t)]
    return t


# --- finding 1: a run in two groups -----------------------------------------------


def test_the_sd_ensemble_is_listed_once_where_its_students_are(lab):
    r = lab["study"].runs
    sd_ens = r["sd-ensemble-seeds-10-11"]
    home = [t for t in lab["tables"] if sd_ens in _listed(t)]
    assert len(home) == 1, [t.label for t in home]
    (t,) = home
    assert set(t.seeds["run_id"]) == {r["train-seed-0"], r["train-seed-1"]}
    assert set(t.self_distillation["run_id"]) == {r["sd-t0-s10"], r["sd-t1-s11"]}
    for other in lab["tables"]:
        if other is not t:
            assert sd_ens not in {x for ids in other.summary["run_ids"] for x in ids}, other.label


def test_a_student_of_another_recipe_is_listed_with_its_teachers_group(lab):
    t = _table_of(lab["tables"], lab["s12"])
    assert t.label.startswith("smoke · epochs=1") and t.seeds["run_id"].tolist() == [lab["t2"]]
    assert t.sd_ensembles.empty and t.ensembles.empty
    student = config.recipe_from_params(runs.get(lab["session"], lab["s12"], "run").params)
    assert student.epochs == 2  # its own override (distill --epochs 2), not its teacher's 1
    # Its recipe differs from its teacher's: the label says so.
    assert t.label == "smoke · epochs=1 · students: epochs=2"


def test_a_students_own_override_is_its_own_variant_never_averaged_with_the_plain_ones(lab):
    r = lab["study"].runs
    t = _table_of(lab["tables"], lab["s20"])
    assert t.label == "smoke · students: lr=0.005"
    assert t.self_distillation["run_id"].tolist() == [lab["s20"]]
    plain = _table_of(lab["tables"], r["sd-t0-s10"])
    assert lab["s20"] not in {x for ids in plain.summary["run_ids"] for x in ids}
    assert plain.summary.set_index("row").loc["SD students", "n"] == 2


def test_every_non_train_run_is_listed_in_one_group_at_most(lab):
    session = lab["session"]
    for run in session.client.search_runs([session.experiment_id], max_results=1000):
        rec = runs.record_of(run)
        if rec.role in ("student", "ensemble") and rec.member_role != "train":
            assert len([t for t in lab["tables"] if rec.run_id in _listed(t)]) <= 1, rec.name


# --- finding 2: two KD gains for one study --------------------------------------


def test_accuracy_from_the_artifact_is_the_logged_one_despite_a_float16_tie(lab, planted):
    kd = planted["kd"]
    p = runs.predictions_of(lab["session"], kd)
    assert p.probs_test[planted["tie"], 0] == p.probs_test[planted["tie"]].max()
    assert 100 * p.correct("test").mean() == pytest.approx(kd.final_test_acc, abs=1e-9)


def test_the_summary_the_gains_table_and_the_study_parent_give_one_kd_gain(lab, planted):
    r = lab["study"].runs
    t = _table_of(planted["tables"], r["kd-seed-100"])
    summary = t.summary.set_index("row")
    singles = [runs.get(lab["session"], r[f"train-seed-{s}"], "run").final_test_acc for s in (0, 1)]
    logged = planted["kd"].final_test_acc - sum(singles) / 2
    gains = t.gains.set_index("gain")
    assert summary.loc["KD students", "gain"] == gains.loc["KD - mean single", "estimate"]
    assert summary.loc["KD students", "gain"] == pytest.approx(logged, abs=1e-12)
    assert lab["parent"].data.metrics["kd_gain"] == pytest.approx(logged, abs=1e-12)
    lo, hi = gains.loc["KD - mean single", ["lo", "hi"]]
    assert lo <= logged <= hi
    for row, kind in (("ensemble", "ensemble - mean single"), ("SD ensemble", "SD ensemble - ensemble")):
        assert summary.loc[row, "gain"] == gains.loc[kind, "estimate"], row


def test_predictions_whose_accuracy_is_not_the_logged_one_are_left_out_and_named(lab, planted):
    sd10 = lab["study"].runs["sd-t0-s10"]
    t = _table_of(planted["tables"], sd10)
    notes = "\n".join(t.notes)
    assert f"run {sd10}: its predictions give" in notes and "left out of the intervals" in notes
    assert sd10 not in set(t.gains["run_id"].dropna())
    assert t.summary.set_index("row").loc["SD students", "n"] == 2  # the table still counts it


def test_predictions_computed_after_the_fact_hold_the_classes_of_the_logged_accuracy(lab, planted):
    rec = runs.get(lab["session"], lab["study"].runs["train-seed-1"], "run")
    assert rec.has_predictions  # logged on the run by backfill, once
    p = runs.predictions_of(lab["session"], rec)
    assert 100 * p.correct("test").mean() == pytest.approx(rec.final_test_acc, abs=1e-9)


# --- finding 5: booleans typed under `mlflow run` -------------------------------


def test_a_boolean_typed_under_mlflow_run_reads_back_as_typed(lab):
    run = lab["session"].client.get_run(lab["t3"])
    rec = runs.record_of(run)
    assert config.recipe_from_params(rec.params) == SMOKE.replace(augment=True, epochs=1)
    assert run.data.params["augment"] == "true"  # as MLflow logged it, never re-logged
    assert not any(k.startswith("resolved.") for k in run.data.params)
    t = _table_of(lab["tables"], lab["t3"])
    assert t.label == "smoke · augment=True · epochs=1" and t.seeds["run_id"].tolist() == [lab["t3"]]


@pytest.mark.parametrize("spelling", [*sorted(config.YES_NO), "True", "FALSE", " Yes "])
def test_every_yes_no_spelling_reads_back_from_the_server(lab, spelling):
    client, exp = lab["session"].client, lab["session"].experiment_id
    rid = client.create_run(exp, run_name="typed").info.run_id
    typed = {"augment": spelling, "nesterov": spelling, "lr": "1e-2", "epochs": "2"}
    # What the run used where `-P` had logged another value: "resolved.<name>".
    params = {**SMOKE.as_params("train"), **typed, "resolved.width": "8"}
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    want = config.YES_NO[spelling.strip().lower()]
    got = config.recipe_from_params(runs.record_of(client.get_run(rid)).params)
    assert got == SMOKE.replace(augment=want, nesterov=want, width=8)


# --- finding 6, compare's side: ensembles of members of different groups ----------


def test_mixed_ensembles_are_listed_apart_with_the_reason_and_in_no_mean(lab):
    mixed, untagged = lab["mixed"], lab["untagged"]
    (apart,) = [t for t in lab["tables"] if t.label == "smoke · mixed"]
    assert set(apart.ensembles["run_id"]) == {mixed, untagged}
    assert apart.summary.empty
    notes = "\n".join(apart.notes)
    assert f"ensemble {mixed}: tagged kd.mixed" in notes
    assert f"ensemble {untagged}: its members are of different groups" in notes
    for t in lab["tables"]:
        if t is not apart:
            assert not {mixed, untagged} & _listed(t), t.label
    text = compare.render(lab["tables"], "markdown")
    assert "## smoke · mixed (digits)" in text and "90.25" in text


# --- every kd.* name lives in schema.py ----------------------------------------


def test_every_kd_tag_name_is_written_in_schema_only():
    package = Path(compare.__file__).parent
    found = [
        f"{path.name}:{node.lineno} {node.value}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "schema.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("kd.")
    ]
    assert found == []
