"""What a run inherits and what it refuses, on a real server: a student trains with its
teacher's recipe, an ensemble does not mix recipes unless asked, a run is reused only
when its logged recipe is the one asked for, a study of another recipe is named for it
and leaves the registry's champion alone."""

from __future__ import annotations

import os
import uuid

import mlflow
import pytest

from kd_mlflow import config, schema, steps, study
from kd_mlflow.config import ConfigError

pytestmark = pytest.mark.e2e

SMOKE = config.PRESETS["smoke"]


@pytest.fixture(scope="module")
def lab(server, cache_dir):
    """An experiment of its own on the session's server: two smoke teachers, one trained
    longer (epochs=3), and that one's student."""
    name = f"lineage-{uuid.uuid4().hex[:8]}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    os.environ.update(MLFLOW_TRACKING_URI=server.uri, MLFLOW_EXPERIMENT_NAME=name)
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(server.uri)
    ex = steps.Execution(cache_dir=cache_dir)
    out = {"name": name, "ex": ex, "client": mlflow.MlflowClient(server.uri)}
    out["t0"] = steps.train(0, SMOKE, "smoke", ex=ex).run_id
    out["long"] = steps.train(2, SMOKE.replace(epochs=3), "smoke", ex=ex).run_id
    out["student"] = steps.distill(out["long"], 20, ex=ex).run_id
    yield out
    mlflow.set_tracking_uri(None)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_a_student_trains_with_its_teachers_recipe(lab):
    run = lab["client"].get_run(lab["student"])
    assert run.data.params["epochs"] == "3"  # the teacher's, not the preset's 2
    assert len(lab["client"].get_metric_history(lab["student"], "val_acc")) == 3
    assert run.data.tags[schema.GROUP_LABEL] == "smoke · epochs=3"
    # A field the user overrides shows in the student's label.
    other = steps.distill(lab["long"], 21, overrides={"lr": 0.02}, ex=lab["ex"]).run_id
    label = lab["client"].get_run(other).data.tags[schema.GROUP_LABEL]
    assert label == "smoke · epochs=3 · lr=0.02"


def test_a_student_of_another_preset_is_refused(lab):
    with pytest.raises(ConfigError, match="keeps its teacher's recipe") as e:
        steps.distill(lab["long"], 22, preset="cpu-demo", ex=lab["ex"])
    assert e.value.name == "preset" and "smoke · epochs=3" in str(e.value)


def test_an_ensemble_of_two_recipes_is_refused_unless_allowed(lab):
    members = [lab["t0"], lab["long"]]
    before = len(lab["client"].search_runs([_exp(lab)], max_results=1000))
    with pytest.raises(ConfigError, match="different recipes") as e:
        steps.ensemble(members, ex=lab["ex"])
    assert "smoke · epochs=3" in str(e.value) and "--allow-mixed" in str(e.value)
    assert len(lab["client"].search_runs([_exp(lab)], max_results=1000)) == before  # no run was made
    run = lab["client"].get_run(steps.ensemble(members, ex=lab["ex"], allow_mixed=True).run_id)
    assert run.data.tags[schema.MIXED] == "true"
    assert run.data.tags[schema.GROUP_LABEL] == "mixed: smoke + smoke · epochs=3"


def test_a_run_is_reused_only_if_its_logged_recipe_is_the_one_asked_for(lab):
    """A FINISHED run that carries this configuration's hash but logged another value
    (a run written by other code, or by hand) is refused, naming the field."""
    c = lab["client"]
    src = c.get_run(lab["t0"])
    tags = {k: v for k, v in src.data.tags.items() if k.startswith("kd.")}
    planted = c.create_run(_exp(lab), run_name="planted", tags=tags).info.run_id
    for key, value in {**src.data.params, "epochs": "7"}.items():
        c.log_param(planted, key, value)
    c.set_terminated(planted, "FINISHED")
    try:
        with pytest.raises(ConfigError, match="logged epochs='7'") as e:
            steps.train(0, SMOKE, "smoke", ex=lab["ex"])
        assert e.value.name == "epochs" and planted in str(e.value)
    finally:
        c.delete_run(planted)
    assert steps.train(0, SMOKE, "smoke", ex=lab["ex"]).run_id == lab["t0"]  # the true one is reused


def test_a_study_of_another_recipe_is_named_for_it_and_leaves_champion_alone(lab):
    registry = f"{lab['name']}-kd-student"

    def run(recipe, overrides):
        plan = study.Plan("smoke", recipe, overrides, [0, 1], kd_seeds=(100,))
        return study.reproduce(plan, ex=lab["ex"], register_as=registry)

    own = run(SMOKE, {})
    longer = run(SMOKE.replace(epochs=3), {"epochs": 3})
    c = lab["client"]
    assert c.get_run(own.parent_run_id).info.run_name == "study-smoke-digits-seeds=0-1"
    assert c.get_run(longer.parent_run_id).info.run_name == "study-smoke-digits-epochs=3-seeds=0-1"
    champion = c.get_model_version_by_alias(registry, "champion")
    assert champion.run_id == own.runs["kd-seed-100"]
    versions = {v.run_id: v for v in c.search_model_versions(f"name = '{registry}'")}
    assert set(versions) == {own.runs["kd-seed-100"], longer.runs["kd-seed-100"]}
    assert versions[longer.runs["kd-seed-100"]].tags[schema.GROUP_LABEL] == "smoke · epochs=3"


def _exp(lab) -> str:
    return lab["client"].get_experiment_by_name(lab["name"]).experiment_id
