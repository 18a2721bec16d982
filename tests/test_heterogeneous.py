"""Teachers and students of different architectures, on a real server at smoke sizes:
resnet20 teachers, their ensemble, a resnet18-cifar KD student of the ensemble, a
same-architecture SD student, a resnet18-cifar student of one teacher (KD, not SD), an
ensemble of two architectures, and a study whose KD student (only) is of another
architecture. The methods, tags and compare's rows say which is which, and a student of
another architecture never joins an SD mean."""

from __future__ import annotations

import json
import os
import uuid

import mlflow
import pytest

from kd_mlflow import compare, config, runs, schema, steps, study, tracking
from kd_mlflow.config import ConfigError

pytestmark = pytest.mark.e2e

# resnet20 at a quarter of its channels (4/8/16) on the 8x8 digits, 2 epochs.
R20 = config.PRESETS["smoke"].replace(model="resnet20", width=16)
A20, A18 = "resnet20@w16", "resnet18-cifar@w16"


@pytest.fixture(scope="module")
def lab(server, cache_dir):
    name = f"arch-{uuid.uuid4().hex[:8]}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    os.environ.update(MLFLOW_TRACKING_URI=server.uri, MLFLOW_EXPERIMENT_NAME=name)
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(server.uri)
    ex = steps.Execution(cache_dir=cache_dir)
    ids = {"t0": steps.train(0, R20, "smoke", ex=ex).run_id, "t1": steps.train(1, R20, "smoke", ex=ex).run_id}
    ids["ens"] = steps.ensemble([ids["t0"], ids["t1"]], ex=ex).run_id
    ids["kd"] = steps.distill(ids["ens"], 100, overrides={"model": "resnet18-cifar"}, ex=ex).run_id
    ids["sd"] = steps.distill(ids["t0"], 10, ex=ex).run_id
    ids["kd1"] = steps.distill(ids["t1"], 11, overrides={"model": "resnet18-cifar"}, ex=ex).run_id
    # A second train group in the experiment: compare must attach students by lineage.
    ids["r18"] = steps.train(0, R20.replace(model="resnet18-cifar"), "smoke", ex=ex).run_id
    yield {"name": name, "ex": ex, "ids": ids, "client": mlflow.MlflowClient(server.uri)}
    mlflow.set_tracking_uri(None)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _run(lab, key):
    return lab["client"].get_run(lab["ids"][key])


def test_methods_and_tags_say_which_is_which(lab):
    want = {  # run: (method, teacher's architecture, the student's model)
        "kd": ("kd", A20, "resnet18-cifar"),
        "sd": ("sd", A20, "resnet20"),
        "kd1": ("kd", A20, "resnet18-cifar"),  # one teacher, another architecture: KD
    }
    for key, (method, teacher_model, model) in want.items():
        run = _run(lab, key)
        got = (run.data.tags[schema.METHOD], run.data.tags[schema.TEACHER_MODEL], run.data.params["model"])
        assert got == (method, teacher_model, model), key
        assert run.data.params["width"] == "16"  # inherited from the teachers' recipe
    # An override of the inherited recipe shows in the run's name (main's rule for any field).
    assert _run(lab, "kd1").info.run_name == "kd-seed-11-model=resnet18-cifar"
    assert _run(lab, "sd").info.run_name == "sd-t0-s10"
    # The override shows in the student's label (relative to the preset: smoke's model
    # is resnet18-cifar, so the resnet20 students name theirs).
    assert _run(lab, "sd").data.tags[schema.GROUP_LABEL] == "smoke · model=resnet20 · width=16"
    assert _run(lab, "kd").data.tags[schema.GROUP_LABEL] == "smoke · width=16"


def test_another_width_is_another_architecture(lab):
    run = lab["client"].get_run(steps.distill(lab["ids"]["t0"], 12, overrides={"width": 8}, ex=lab["ex"]).run_id)
    assert (run.data.tags[schema.METHOD], run.data.tags[schema.TEACHER_MODEL]) == ("kd", A20)


def test_compare_never_puts_another_architecture_in_an_sd_mean(lab):
    ids = lab["ids"]
    # The fixture's runs only: the tests after this one add their own (a mixed ensemble,
    # a study), in whatever order they run.
    frame = runs.results_frame(tracking.connect(lab["name"]))
    tables = compare.build_tables(frame[frame["run_id"].isin(set(ids.values()))])
    sd_tables = [t for t in tables if not t.self_distillation.empty]
    assert len(sd_tables) == 1
    own = sd_tables[0]
    assert list(own.self_distillation["run_id"]) == [ids["sd"]]
    assert list(own.self_distillation["architectures"]) == [f"{A20} -> {A20}"]
    sd_row = own.summary.set_index("row").loc["SD students"]
    assert sd_row["run_ids"] == [ids["sd"]]
    for t in tables:  # no student of another architecture in any SD table or mean
        assert not {ids["kd"], ids["kd1"]} & set(t.self_distillation["run_id"])
    kd = next(t for t in tables if ids["kd"] in set(t.kd["run_id"]))
    assert set(kd.kd["run_id"]) == {ids["kd"], ids["kd1"]}  # one student architecture, one table
    assert set(kd.kd["architectures"]) == {f"{A20} -> {A18}"}
    assert kd.label == f"smoke · model=resnet20 · width=16 · {A20} -> {A18}"
    assert kd.self_distillation.empty and list(kd.seeds["run_id"]) == [ids["t0"], ids["t1"]]
    r18 = next(t for t in tables if ids["r18"] in set(t.seeds["run_id"]))
    assert r18.kd.empty and r18.self_distillation.empty and r18.label == "smoke · width=16"
    md = compare.render(tables, "markdown")
    assert f"### Knowledge distillation (teacher left, student right): {A20} -> {A18}" in md
    assert f"### Self-distillation (teacher left, student right): {A20} -> {A20}" in md
    doc = json.loads(compare.render([kd], "json"))
    assert {r["run_id"]: r["architectures"] for r in doc["kd"]} == {
        ids["kd"]: f"{A20} -> {A18}",
        ids["kd1"]: f"{A20} -> {A18}",
    }


def test_an_ensemble_of_two_architectures(lab):
    """Members of different architectures are different recipes: refused unless
    --allow-mixed (the rule for any two recipes); allowed, the ensemble evaluates and
    teaches, and its student's tag names both architectures."""
    members = [lab["ids"]["t0"], lab["ids"]["r18"]]
    with pytest.raises(ConfigError, match="different recipes"):
        steps.ensemble(members, ex=lab["ex"])
    mixed = steps.ensemble(members, ex=lab["ex"], allow_mixed=True).run_id
    run = lab["client"].get_run(mixed)
    assert run.data.tags[schema.MIXED] == "true" and run.data.metrics[schema.FINAL_TEST_ACC] > 0
    student = lab["client"].get_run(steps.distill(mixed, 101, overrides={"model": "resnet8"}, ex=lab["ex"]).run_id)
    assert student.data.tags[schema.METHOD] == "kd"
    assert student.data.tags[schema.TEACHER_MODEL] == f"{A20}+{A18}"


def test_a_study_with_a_kd_student_of_another_architecture(lab):
    """reproduce --student-model: only the KD student changes architecture; the SD
    students keep their teachers'. The study's summary has both, from their tables."""
    plan = study.Plan(
        "smoke",
        R20,
        {"model": "resnet20", "width": 16},
        [0, 1],
        kd_seeds=(100,),
        student_model="resnet18-cifar",
        student_width=16,  # the teachers' width: as distill --model made it
    )
    result = study.reproduce(plan, ex=lab["ex"], register_as=None)
    c, ids = lab["client"], lab["ids"]
    assert result.runs["kd-seed-100"] == ids["kd"]  # the same student as distill --model made: reused
    assert result.runs["sd-t0-s10"] == ids["sd"]
    sd11 = c.get_run(result.runs["sd-t1-s11"])
    assert (sd11.data.tags[schema.METHOD], sd11.data.params["model"]) == ("sd", "resnet20")
    parent = c.get_run(result.parent_run_id)
    assert parent.info.run_name == "study-smoke-digits-model=resnet20-width=16-student_model=resnet18-cifar-seeds=0-1"
    assert {"kd_test_acc", "sd_test_acc_mean", "ensemble_test_acc"} <= set(parent.data.metrics)
    kd = c.get_run(ids["kd"]).data.metrics[schema.FINAL_TEST_ACC]
    assert parent.data.metrics["kd_test_acc"] == pytest.approx(kd)
    assert f"{A20} -> {A18}" in result.tables
    # The KD student's network alone, on the teachers' seeds: seed 0 is the lab's r18, reused.
    alone = [result.runs[f"train-seed-{s}-model=resnet18-cifar"] for s in (0, 1)]
    assert alone[0] == ids["r18"] and "train-seed-1-model=resnet18-cifar" in result.trained
    own = [c.get_run(r).data.metrics[schema.FINAL_TEST_ACC] for r in alone]
    singles = [c.get_run(ids[t]).data.metrics[schema.FINAL_TEST_ACC] for t in ("t0", "t1")]
    m = parent.data.metrics
    assert m["alone_test_acc"] == pytest.approx(sum(own) / 2)
    assert m["kd_over_alone_gain"] == pytest.approx(kd - sum(own) / 2)  # what KD did
    assert m["alone_gain"] == pytest.approx((sum(own) - sum(singles)) / 2)  # what the network costs
    assert m["kd_gain"] == pytest.approx(kd - sum(singles) / 2)
    assert "| KD - student's network alone |" in result.tables and "student's network alone" in result.tables


@pytest.mark.parametrize("width", [None, 32])
def test_a_study_student_of_another_model_has_that_models_width_unless_told(lab, width):
    """reproduce --student-model resnet8 built it at the teachers' width 16 (on smoke:
    4, a 395-parameter network); it is resnet8 as published (width 64), or at
    --student-width, and the study's label says so."""
    from kd_mlflow import models

    plan = study.Plan(
        "smoke", R20, {"model": "resnet20", "width": 16}, [0, 1], student_model="resnet8", student_width=width
    )
    result = study.reproduce(plan, ex=lab["ex"], register_as=None)
    kd = result.runs["kd-seed-100"]
    want = width or config.PUBLISHED_WIDTH
    assert lab["client"].get_run(kd).data.params["width"] == str(want)
    net = mlflow.pytorch.load_model(f"runs:/{kd}/model")
    assert sum(p.numel() for p in net.parameters()) == models.size("resnet8", want, 10)["parameters"]
    parent = lab["client"].get_run(result.parent_run_id)
    assert parent.data.tags[schema.GROUP_LABEL].endswith(f"student_model=resnet8 · student_width={want}")
