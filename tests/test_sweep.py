"""Sweeps: the grid's students nested under one parent, the setting chosen on validation
only (never on test), reused on a rerun, the same runs when packed."""

from __future__ import annotations

import os
import sys
import uuid

import mlflow
import pandas as pd
import pytest
from conftest import invoke

from kd_mlflow import config, schema, steps, sweep
from kd_mlflow.config import ConfigError


def _rows(points):
    return pd.DataFrame(
        [
            {"temperature": t, "alpha": a, "seed": s, "val_acc": v, "test_acc": te, "run_id": f"r{i}"}
            for i, (t, a, s, v, te) in enumerate(points)
        ]
    )


def test_the_choice_is_the_best_validation_mean_never_the_best_test():
    rows = _rows(
        [
            (1.0, 0.5, 100, 80.0, 70.0),
            (1.0, 0.5, 101, 82.0, 71.0),  # val 81.0: chosen
            (2.0, 0.5, 100, 79.0, 99.0),
            (2.0, 0.5, 101, 80.0, 99.0),  # best test, worse val: planted
            (4.0, 0.5, 100, 60.0, 60.0),
            (4.0, 0.5, 101, 61.0, 60.0),
        ]
    )
    table = sweep.select(rows, ["temperature", "alpha"])
    best = sweep.chosen(table)
    assert (best.temperature, best.alpha) == (1.0, 0.5) and best.val_mean == 81.0
    assert best.val_mean == rows[rows.temperature == 1.0].val_acc.mean()
    text = sweep.render(table, ["temperature", "alpha"], show_test=False)
    assert "99.00" not in text and "70.50" in text  # only the chosen setting's test accuracy is shown
    assert "99.00" in sweep.render(table, ["temperature", "alpha"], show_test=True)


def test_ties_go_to_the_smaller_temperature_then_the_smaller_alpha():
    """Each tie is one the other order (alpha first, larger first, or the grid's own
    order, alpha listed first) breaks the other way."""

    def choice(points):
        table = sweep.select(_rows([(t, a, 100, v, 0.0) for t, a, v in points]), ["alpha", "temperature"])
        return tuple(sweep.chosen(table)[["temperature", "alpha"]])

    assert choice([(4.0, 0.5, 80.0), (2.0, 1.0, 80.0), (1.0, 0.25, 79.0)]) == (2.0, 1.0)  # temperature first
    assert choice([(2.0, 1.0, 80.0), (2.0, 0.5, 80.0), (4.0, 0.25, 79.0)]) == (2.0, 0.5)  # then alpha


def test_a_grid_is_typed_and_checked_before_anything_runs():
    grid = sweep.parse_grid({"temperature": "1,2,4", "alpha": "0.5, 1"})
    assert grid.axes == (("temperature", (1.0, 2.0, 4.0)), ("alpha", (0.5, 1.0)))
    assert len(grid.settings()) == 6 and grid.label() == "temperature=1,2,4-alpha=0.5,1"
    for lists, name in (
        ({"alpha": "0.5,2"}, "alpha"),
        ({"temperature": "1,x"}, "temperature"),
        ({"mean": "0.5"}, "mean"),
        ({"alpha": "1,1"}, "alpha"),
        ({}, "grid"),
    ):
        with pytest.raises(ConfigError) as e:
            sweep.parse_grid(lists)
        assert e.value.name == name


@pytest.fixture(scope="module")
def swept(server, cache_dir):
    """A smoke teacher, then a 2 x 2 sweep of its SD students (one seed), in an
    experiment of its own; then the same sweep again."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    os.environ.update(MLFLOW_TRACKING_URI=server.uri, MLFLOW_EXPERIMENT_NAME=name)
    os.environ.pop("MLFLOW_RUN_ID", None)
    ex = steps.Execution(cache_dir=cache_dir)
    teacher = steps.train(0, config.PRESETS["smoke"], "smoke", ex=ex).run_id
    grid = sweep.parse_grid({"temperature": "1,4", "alpha": "0.5,1"})
    plan = sweep.SweepPlan(teacher, [10], grid)
    losses = cache_dir / f"{name}-lone-steps.txt"
    os.environ["KD_MLFLOW_STEP_LOSSES"] = str(losses)  # every step's loss (kd_mlflow.train)
    try:
        first = sweep.run(plan, ex=ex)
    finally:
        del os.environ["KD_MLFLOW_STEP_LOSSES"]
    again = sweep.run(plan, ex=ex)
    c = mlflow.MlflowClient(server.uri)
    yield {
        "client": c,
        "exp": c.get_experiment_by_name(name).experiment_id,
        "first": first,
        "again": again,
        "teacher": teacher,
        "plan": plan,
        "ex": ex,
        "name": name,
        "lone_steps": losses.read_text().splitlines(),
    }
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.mark.e2e
def test_a_sweep_is_one_parent_with_its_grid_nested_and_chosen_on_validation(swept):
    c, parent = swept["client"], swept["first"][1]
    children = c.search_runs([swept["exp"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4 and all(r.data.tags[schema.METHOD] == "sd" for r in children)
    settings = {(r.data.params["temperature"], r.data.params["alpha"]) for r in children}
    assert settings == {("1.0", "0.5"), ("1.0", "1.0"), ("4.0", "0.5"), ("4.0", "1.0")}
    p = c.get_run(parent)
    assert p.data.tags[schema.SWEEP] == "true" and p.info.status == "FINISHED"
    assert p.info.run_name == "sweep-sd-train-seed-0-temperature=1,4-alpha=0.5,1"
    # The choice is the argmax of the children's logged validation accuracy.
    vals = {(float(r.data.params["temperature"]), float(r.data.params["alpha"])): r for r in children}
    best = max(sorted(vals), key=lambda k: vals[k].data.metrics[schema.FINAL_VAL_ACC])
    assert (float(p.data.params["best_temperature"]), float(p.data.params["best_alpha"])) == best
    assert p.data.metrics["best_val_acc_mean"] == vals[best].data.metrics[schema.FINAL_VAL_ACC]
    assert p.data.metrics["best_test_acc_mean"] == vals[best].data.metrics[schema.FINAL_TEST_ACC]
    assert {f.path for f in c.list_artifacts(parent)} >= {"sweep.md", "sweep.json", "sweep.png"}
    # Run names say what each student changes.
    assert {r.info.run_name for r in children} >= {"sd-t0-s10-temperature=4", "sd-t0-s10-alpha=0.5"}


@pytest.mark.e2e
def test_a_rerun_trains_nothing_and_keeps_one_parent(swept):
    c = swept["client"]
    assert swept["again"][1] == swept["first"][1]
    # The grid's students, each once; an Optuna search of this file may add others.
    grid = {(t, a) for t in ("1.0", "4.0") for a in ("0.5", "1.0")}
    students = c.search_runs([swept["exp"]], f"tags.`{schema.ROLE}` = 'student'")
    mine = [r for r in students if (r.data.params["temperature"], r.data.params["alpha"]) in grid]
    assert len(mine) == 4


@pytest.mark.e2e
def test_a_packed_sweep_gives_the_same_runs(swept, cache_dir):
    """In a fresh experiment, the four students trained as one packed wave: the same
    identities, each network with its own temperature and alpha from the first step
    (first-step losses equal to the lone students', and different between settings).
    Later steps drift apart by float32 rounding alone (train loss 4e-7 to 1e-3 apart
    after one epoch here); tests/test_parity.py follows whole trajectories in float64."""
    from kd_mlflow import executors

    name = f"{swept['name']}-packed"
    losses = cache_dir / f"{name}-steps.txt"
    os.environ.update(MLFLOW_EXPERIMENT_NAME=name, KD_MLFLOW_STEP_LOSSES=str(losses))
    try:
        sweep.run(swept["plan"], ex=swept["ex"], executor=executors.PackedWaves(executors.InProcess()))
    finally:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = swept["name"]
        del os.environ["KD_MLFLOW_STEP_LOSSES"]
    c = swept["client"]
    packed = c.search_runs([c.get_experiment_by_name(name).experiment_id], f"tags.`{schema.ROLE}` = 'student'")
    lone = c.search_runs([swept["exp"]], f"tags.`{schema.ROLE}` = 'student'")
    assert len(packed) == 4 and all(r.data.tags[schema.PACKED] == "4" for r in packed)
    assert {r.data.tags[schema.CONFIG_HASH] for r in packed} == {r.data.tags[schema.CONFIG_HASH] for r in lone}
    first_packed = [float(x) for x in losses.read_text().splitlines()[0].split()]
    steps_per_run = len(swept["lone_steps"]) // 4  # the lone students ran one after another, in grid order
    first_lone = [float(swept["lone_steps"][k * steps_per_run]) for k in range(4)]
    assert first_packed == pytest.approx(first_lone, abs=1e-5)
    assert len({round(x, 4) for x in first_lone}) == 4  # each setting's own objective


# --- a search: Optuna's trials as the grid's students ----------------------------------


def test_a_search_takes_ranges_only_when_asked_and_rounds_what_it_trains():
    grid = sweep.parse_grid({"temperature": "1:8", "alpha": "0.5,1", "epochs": "1:3"}, ranges=True)
    assert grid.axes == (
        ("temperature", sweep.Range(1.0, 8.0)),
        ("alpha", (0.5, 1.0)),
        ("epochs", sweep.Range(1, 3)),
    )
    assert grid.label() == "temperature=1:8-alpha=0.5,1-epochs=1:3"
    assert sweep.parse_grid({"lr": "1e-4:1e-2:log"}, ranges=True).axes == (("lr", sweep.Range(1e-4, 1e-2, True)),)
    for lists, ranges in (
        ({"temperature": "1:8"}, False),  # a range needs --search optuna
        ({"temperature": "8:1"}, True),
        ({"temperature": "0:8"}, True),  # the recipe's own check: > 0
        ({"temperature": "1:8:lin"}, True),
        ({"alpha": "0:1:log"}, True),
        ({"augment": "0:1"}, True),  # not numeric
    ):
        with pytest.raises(ConfigError) as e:
            sweep.parse_grid(lists, ranges=ranges)
        assert e.value.name == next(iter(lists))
    assert [sweep.rounded(x, 1.0, 8.0) for x in (2.34567, 7.99999, 1.000001, 0.5)] == [2.35, 8.0, 1.0, 1.0]


def _needs_optuna():
    pytest.importorskip("optuna", reason="the optuna extra is not installed: pip install 'kd-mlflow[optuna]'")


def test_a_search_tells_optuna_validation_and_chooses_by_the_grids_rule():
    """Optuna's real TPE sampler over a stand-in for the students: every trained setting
    is a rounded recipe value, trained once; the same seed asks the same settings (so a
    rerun reuses); and the choice over the trials is the best validation mean, never the
    planted best test."""
    _needs_optuna()
    grid = sweep.parse_grid({"temperature": "1:8", "alpha": "0.5,1"}, ranges=True)
    plan = sweep.SweepPlan("t" * 32, [100], grid, search=sweep.Search(trials=6, seed=0))

    def searched():
        trained = []

        def train(settings):
            (setting,) = settings
            trained.append(setting)
            t, a = dict(setting)["temperature"], dict(setting)["alpha"]
            val = 90.0 - abs(t - 3.0) - a  # best validation: temperature near 3, alpha 0.5
            return [{"temperature": t, "alpha": a, "seed": 100, "val_acc": val, "test_acc": t * 10, "run_id": str(t)}]

        return sweep._searched(sweep.optuna_module(), plan, train), trained

    rows, trained = searched()
    assert len(trained) == len(set(trained)) >= 2
    assert all(t == float(f"{t:.3g}") and 1.0 <= t <= 8.0 for t in (dict(s)["temperature"] for s in trained))
    assert searched()[1] == trained  # seeded: a rerun asks the same settings
    table = sweep.select(pd.DataFrame(rows), grid.names)
    best = sweep.chosen(table)
    assert best.val_mean == max(r["val_acc"] for r in rows)
    assert best.test_mean < max(r["test_acc"] for r in rows)  # the planted best test is not chosen


@pytest.mark.e2e
def test_an_optuna_search_is_nested_students_chosen_on_validation_and_reused(swept):
    """Three trials of the smoke teacher's students, under a search parent of their own;
    the same search again trains nothing."""
    _needs_optuna()
    c = swept["client"]
    grid = sweep.parse_grid({"temperature": "1:8", "alpha": "0.5,1"}, ranges=True)
    plan = sweep.SweepPlan(swept["teacher"], [10], grid, search=sweep.Search(trials=3, seed=0))
    _, parent = sweep.run(plan, ex=swept["ex"])
    students = {r.info.run_id for r in c.search_runs([swept["exp"]], f"tags.`{schema.ROLE}` = 'student'")}
    assert sweep.run(plan, ex=swept["ex"])[1] == parent
    again = {r.info.run_id for r in c.search_runs([swept["exp"]], f"tags.`{schema.ROLE}` = 'student'")}
    assert again == students  # the rerun trained nothing
    children = c.search_runs([swept["exp"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert 1 <= len(children) <= 3 and all(r.data.tags[schema.ROLE] == "student" for r in children)
    p = c.get_run(parent)
    assert p.data.tags[schema.SEARCH] == "optuna" and p.data.tags[schema.SWEEP] == "true"
    assert (p.data.params["trials"], p.data.params["search_seed"]) == ("3", "0")
    assert p.info.run_name == "sweep-sd-train-seed-0-temperature=1:8-alpha=0.5,1-optuna-3-seed-0"
    key = lambda r: (float(r.data.params["temperature"]), float(r.data.params["alpha"]))
    best = max(sorted(children, key=key), key=lambda r: r.data.metrics[schema.FINAL_VAL_ACC])
    assert (float(p.data.params["best_temperature"]), float(p.data.params["best_alpha"])) == key(best)
    assert p.data.metrics["best_val_acc_mean"] == best.data.metrics[schema.FINAL_VAL_ACC]


@pytest.mark.parametrize(
    "args,reason",
    [
        (["sweep", "--temperature", "1:8"], "a range lo:hi is searched (kd-mlflow sweep --search optuna)"),
        (["sweep", "--alpha", "0.5,1", "--trials", "3"], "give --trials N with --search optuna"),
        (["sweep", "--alpha", "0:1", "--search", "optuna"], "give --trials N with --search optuna"),
        (["reproduce", "--preset", "smoke", "--sweep-kd", "temperature"], "not FIELD=V1,V2"),
        (
            ["reproduce", "--preset", "smoke", "--sweep-kd", "alpha=0.5", "--sweep-kd", "alpha=1"],
            "alpha is given twice",
        ),
        (["reproduce", "--preset", "smoke", "--sweep-kd", "alpha=0:1"], "a range lo:hi is searched"),
    ],
)
def test_a_search_or_a_study_sweep_given_wrong_is_refused_before_anything_runs(args, reason):
    if args[0] == "sweep":
        args = [*args, "--teacher", "a" * 32]
    res = invoke(*args)
    assert res.exit_code == 2 and reason in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_search_without_optuna_says_how_to_install_it(monkeypatch, tracked):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    res = invoke("sweep", "--teacher", "a" * 32, "--search", "optuna", "--trials", "2", "--temperature", "1:8")
    assert res.exit_code == 1 and "pip install 'kd-mlflow[optuna]'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and tracked.runs() == []


# --- a study's KD student, swept ----------------------------------------------------------


@pytest.mark.e2e
def test_reproduce_sweeps_the_kd_student_and_its_row_is_the_setting_chosen_on_validation(tracked):
    """`reproduce --sweep-kd temperature=1,2` (smoke, two teacher seeds, in this process):
    the sweep's parent nested under the study's, its two KD students under it, the KD row
    the one chosen on validation, said by the tag and by compare; a rerun trains nothing."""
    study = ("reproduce", "--preset", "smoke", "--seeds", "0-1", "--sweep-kd", "temperature=1,2", "--no-register")
    res = invoke(*study)
    assert res.exit_code == 0, res.stderr[-3000:]
    runs = {r.info.run_id: r for r in tracked.runs()}
    (parent,) = [r for r in runs.values() if r.data.tags.get(schema.STUDY) == "true"]
    (swept,) = [r for r in runs.values() if r.data.tags.get(schema.SWEEP) == "true"]
    assert parent.info.run_name == "study-smoke-digits-sweep_kd=temperature=1,2-seeds=0-1"
    assert swept.data.tags["mlflow.parentRunId"] == parent.info.run_id
    kd = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == swept.info.run_id]
    assert sorted(float(r.data.params["temperature"]) for r in kd) == [1.0, 2.0]
    assert all(r.data.tags[schema.METHOD] == "kd" and r.data.tags[schema.SEED] == "100" for r in kd)
    best = max(
        sorted(kd, key=lambda r: float(r.data.params["temperature"])), key=lambda r: r.data.metrics["final_val_acc"]
    )
    t = format(float(best.data.params["temperature"]), "g")
    choice = f"temperature={t} chosen on validation over 2 settings (sweep run {swept.info.run_id})"
    assert parent.data.tags[schema.SWEEP_KD_CHOICE] == choice
    assert runs[best.info.run_id].data.tags[schema.SWEEP_KD_CHOICE] == choice
    assert parent.data.metrics["kd_test_acc"] == best.data.metrics["final_test_acc"]
    assert f"KD: {choice}" in res.stdout  # the study's tables
    assert f"KD: {choice}" in invoke("compare", "--no-intervals").stdout

    again = invoke(*study)
    assert again.exit_code == 0, again.stderr[-3000:]
    assert {r.info.run_id for r in tracked.runs()} == set(runs) and "0 step(s) ran" in again.stderr
