"""MLflow's own features for training runs, on a real server: the machine's metrics on
every run (System metrics tab), the selected model as a LoggedModel with its result
metrics (Models tab), the split's parts as dataset inputs, and the shared view the
printed link opens, read back as MLflow's UI reads it."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
from conftest import invoke, run_cli

from kd_mlflow import runs, schema, tracking, view

pytestmark = pytest.mark.e2e  # a real server

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def trained(server, cache_dir):
    """One smoke training run, through the CLI as a user runs it, in its own experiment."""
    env = {
        "MLFLOW_TRACKING_URI": server.uri,
        "KD_MLFLOW_CACHE": str(cache_dir),
        "MLFLOW_EXPERIMENT_NAME": "native-train",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(server.uri)
        res = invoke("train", "--seed", "0", "--preset", "smoke")
        assert res.exit_code == 0, res.output[-3000:]
        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("native-train")
        (run,) = client.search_runs([exp.experiment_id])
        yield run, client
        mlflow.set_tracking_uri(None)


def test_a_training_run_has_the_machines_metrics(trained):
    run, client = trained
    for key in (CPU, MEMORY):
        assert key in run.data.metrics, sorted(k for k in run.data.metrics if k.startswith("system/"))
    memory = client.get_metric_history(run.info.run_id, MEMORY)
    assert all(m.value > 0 for m in memory)


def test_the_runs_model_is_a_logged_model_with_its_result_metrics(trained):
    run, client = trained
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id='{run.info.run_id}'",
        output_format="list",
    )
    assert len(found) == 1, found
    assert tracking._model_id(client.get_run(run.info.run_id)) == found[0].model_id  # what the registry registers
    by_key = {m.key: m for m in found[0].metrics}
    digest = run.data.tags[schema.SPLIT_DIGEST]
    for key, part in ((schema.FINAL_TEST_ACC, "test"), (schema.FINAL_VAL_ACC, "validation"), ("test_nll", "test")):
        assert by_key[key].value == run.data.metrics[key], key
        assert (by_key[key].dataset_name, by_key[key].dataset_digest) == (f"digits-{part}", digest), key
    # The run's own result is logged once, not once more for the model.
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, schema.FINAL_TEST_ACC)) == 1


def test_a_model_goes_to_its_runs_experiment_with_the_environment_left_alone(tracked, monkeypatch):
    """MLflow 3 files a LoggedModel under the fluent API's experiment (here: Default):
    log_model names its run's, with the run's params and the pinned requirements, and
    neither sets nor restores an MLflow variable of the process's environment, which
    another thread (MLflow's own, a user's) would see change under it. (torch.export sets
    TORCHINDUCTOR_CACHE_DIR once, for good: torch's, not watched.)"""
    import torch

    session = tracking.connect()
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")  # the fluent API's experiment is now Default
    writer = tracking.RunWriter(session, None, "tiny")
    tracking.log_params(session, writer.run_id, {"seed": 7})

    def mlflows():
        return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}

    before, changed, done = mlflows(), set(), threading.Event()

    def watch():  # the whole call long: logging a model takes hundreds of milliseconds
        while not done.wait(0.001):
            now = mlflows()
            changed.update(k for k in before.keys() | now.keys() if now.get(k) != before.get(k))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        writer.log_model(torch.nn.Linear(4, 2), torch.zeros(2, 4))
    finally:
        done.set()
        watcher.join()
    writer.end()
    assert not changed and mlflows() == before, changed
    (model,) = mlflow.search_logged_models(
        experiment_ids=[session.experiment_id], filter_string=f"source_run_id='{writer.run_id}'", output_format="list"
    )
    assert model.params == {"seed": "7"} and model.status == "READY"
    path = mlflow.artifacts.download_artifacts(run_id=writer.run_id, artifact_path="model/requirements.txt")
    assert set(tracking.model_requirements()) <= set(Path(path).read_text().split())


def test_the_splits_parts_are_the_runs_inputs(trained):
    run, _ = trained
    inputs = {
        i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
        for i in run.inputs.dataset_inputs
    }
    digest = run.data.tags[schema.SPLIT_DIGEST]
    assert inputs == {
        "digits-train": (digest, "training"),
        "digits-validation": (digest, "validation"),
        "digits-test": (digest, "testing"),
    }


def _writer_life(session, run_id, status):
    writer = tracking.RunWriter(session, run_id, "system-metrics")
    writer.end(status)
    return writer.run_id


def test_a_resumed_run_continues_its_system_metrics(tracked):
    session = tracking.connect()
    run_id = _writer_life(session, None, "KILLED")  # a first life, cut short
    _writer_life(session, run_id, "FINISHED")  # resumed: RunWriter given the run
    steps = [m.step for m in tracked.client.get_metric_history(run_id, CPU)]
    assert sorted(steps) == list(range(len(steps))) and len(steps) >= 2, steps


def test_mlflows_switch_turns_them_off(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    run_id = _writer_life(tracking.connect(), None, "FINISHED")
    assert not [k for k in tracked.client.get_run(run_id).data.metrics if k.startswith("system/")]


def test_without_psutil_a_run_says_so_in_one_line_and_finishes(tracked, tmp_path):
    shadow = tmp_path / "no-psutil"
    shadow.mkdir()
    (shadow / "psutil.py").write_text("raise ImportError(\"No module named 'psutil'\")\n")
    proc = run_cli("train", "--seed", "1", "--preset", "smoke", env={**tracked.env, "PYTHONPATH": str(shadow)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("no system metrics") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (run,) = tracked.runs()
    assert run.info.status == "FINISHED" and not [k for k in run.data.metrics if k.startswith("system/")]


# --- the shared view, read as MLflow's UI reads it -----------------------------------


def _ui_bundle() -> str:
    """MLflow's UI code as installed (minified): the rules are read from it, so that a
    change of MLflow's format fails here rather than in a user's browser."""
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="replace") for p in sorted(js.glob("*.js")))


def _ui_list(bundle: str, first: str, second: str) -> list[str]:
    """A string array literal of the bundle, found by its first two items."""
    found = re.search(r'\["' + first + '","' + second + r'"(?:,"[A-Za-z]+")*\]', bundle)
    assert found, f"MLflow's UI has no list starting {first}, {second}: its format changed"
    return json.loads(found.group())


def read_as_the_ui(tags: dict, key: str, bundle: str) -> tuple[dict, dict]:
    """(search facets, UI state) as MLflow 3.17's useSharedViewState hook takes them: the
    tag named by its prefix and the key, parsed as JSON, the facet keys and the UI-state
    keys picked (less those never shared); anything else is dropped."""
    prefix = re.search(r'"(mlflow\.sharedViewState\.)"', bundle).group(1)
    value = json.loads(tags[prefix + key])
    facets = _ui_list(bundle, "searchFilter", "orderByKey")
    ui_keys = _ui_list(bundle, "selectedColumns", "columnOrder")
    unshared = _ui_list(bundle, "runsExpanded", "runsPinned")
    assert set(value) <= set(facets) | set(ui_keys), f"keys the UI drops: {set(value) - set(facets) - set(ui_keys)}"
    return {k: value[k] for k in facets if k in value}, {
        k: value[k] for k in ui_keys if k in value and k not in unshared
    }


def _named(column: str) -> tuple[str, str]:
    kind, name = re.fullmatch(r"(metrics|params|tags|attributes)\.`(.+)`", column).groups()
    return kind, name


def test_the_view_reads_as_the_ui_reads_it_and_names_what_exists(trained):
    run, client = trained
    session = tracking.connect("native-train", create=False)
    link = view.link(session)
    query = parse_qs(urlsplit(urlsplit(link).fragment).query)
    bundle = _ui_bundle()
    # A facet in the link's query makes the UI ignore the shared view.
    assert not set(query) & set(_ui_list(bundle, "searchFilter", "orderByKey")), query
    assert query["compareRunsMode"] == ["CHART"]
    (key,) = query["viewStateShareKey"]
    facets, ui = read_as_the_ui(client.get_experiment(session.experiment_id).tags, key, bundle)

    metrics, tags = run.data.metrics, run.data.tags
    assert _named(facets["orderByKey"]) == ("metrics", schema.FINAL_TEST_ACC) and facets["orderByAsc"] is False
    columns = [_named(c) for c in ui["selectedColumns"]]
    assert columns == [("metrics", k) for k in view.COLUMNS] and all(k in metrics for _, k in columns)
    group = ui["groupBy"]
    assert group["aggregateFunction"] in ("min", "average", "max")
    assert [(g["mode"], g["groupByData"]) for g in group["groupByKeys"]] == [
        ("tag", schema.GROUP_LABEL),
        ("tag", schema.ROLE),
    ]
    assert all(g["groupByData"] in tags for g in group["groupByKeys"])
    sections = {s["uuid"] for s in ui["compareRunSections"]}
    for chart in ui["compareRunCharts"]:
        assert chart["type"] == "LINE" and chart["metricSectionId"] in sections
        history = client.get_metric_history(run.info.run_id, chart["metricKey"])
        # test_acc: a curve only where the recipe tests each epoch (not smoke's)
        assert history or chart["metricKey"] == "test_acc", chart["metricKey"]
    assert len(view.encoded()) < 5000  # well inside an experiment tag (MLflow: 20,000 characters)


# --- checkpoints as LoggedModels (--log-checkpoints), and --no-system-metrics ---------


def _models_of(run, order_by=None) -> list:
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id='{run.info.run_id}'",
        order_by=order_by,
        output_format="list",
    )


def _val_acc(model) -> float | None:
    return next((m.value for m in model.metrics or [] if m.key == "val_acc"), None)


@pytest.fixture(scope="module")
def checkpointed(server, cache_dir):
    """A smoke training run of four epochs with a checkpoint every epoch and without the
    machine's metrics, through the CLI, in its own experiment."""
    with pytest.MonkeyPatch.context() as mp:
        for key in (
            "MLFLOW_RUN_ID",
            "MLFLOW_EXPERIMENT_ID",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
            runs.LOG_CHECKPOINTS_ENV,
        ):
            mp.delenv(key, raising=False)  # and restored after: the flags set them in this process
        env = {
            "MLFLOW_TRACKING_URI": server.uri,
            "KD_MLFLOW_CACHE": str(cache_dir),
            "MLFLOW_EXPERIMENT_NAME": "native-ckpt",
        }
        for key, value in env.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(server.uri)
        args = ("train", "--seed", "0", "--preset", "smoke", "--epochs", "4")
        res = invoke(*args, "--log-checkpoints", "1", "--no-system-metrics")
        assert res.exit_code == 0, res.output[-3000:]
        client = mlflow.MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("native-ckpt").experiment_id])
        yield run, client
        mlflow.set_tracking_uri(None)


def test_ranked_by_val_acc_a_runs_checkpoints_put_the_selected_epoch_first(checkpointed):
    run, client = checkpointed
    # Ties keep the earliest epoch, as the selection does (MLflow breaks them newest first).
    ranked = _models_of(
        run, [{"field_name": "metrics.val_acc", "ascending": False}, {"field_name": "creation_timestamp"}]
    )
    best = int(run.data.metrics[schema.BEST_EPOCH])
    assert ranked[0].name == f"checkpoint-{best}", [(m.name, _val_acc(m)) for m in ranked]
    # One checkpoint per epoch, each with its epoch's val_acc and val_loss, linked to the
    # validation part; the selected model last (it has final_val_acc, not val_acc).
    assert sorted(m.name for m in ranked) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "model"]
    assert ranked[-1].name == "model" and _val_acc(ranked[-1]) is None
    digest = run.data.tags[schema.SPLIT_DIGEST]
    for key in tracking.CHECKPOINT_METRICS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key  # the run's curve holds each epoch once
        for model in ranked[:-1]:
            (metric,) = [m for m in model.metrics if m.key == key]
            epoch = int(model.name.split("-")[1])
            assert (metric.step, metric.value) == (epoch, history[epoch]), (model.name, key)
            assert (metric.dataset_name, metric.dataset_digest) == ("digits-validation", digest)
    # What the registry registers is still the selected model.
    assert tracking._model_id(client.get_run(run.info.run_id)) == ranked[-1].model_id


def test_no_system_metrics_gives_a_run_without_them(checkpointed):
    run, _ = checkpointed
    assert run.info.status == "FINISHED"
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_a_packed_waves_runs_each_log_their_own_networks_checkpoints(tracked, monkeypatch):
    """Each run's checkpoint of its selected epoch holds that run's selected weights (its
    weights artifact): network i of the pack, not another's."""
    import torch

    monkeypatch.delenv(runs.LOG_CHECKPOINTS_ENV, raising=False)  # restored after the flag sets it
    res = invoke("train", "--seeds", "0-1", "--pack", "--preset", "smoke", "--log-checkpoints", "1")
    assert res.exit_code == 0, res.output[-3000:]
    trained = tracked.runs()
    assert len(trained) == 2
    for run in trained:
        models = {m.name: m for m in _models_of(run)}
        assert sorted(models) == ["checkpoint-1", "checkpoint-2", "model"], sorted(models)
        best = int(run.data.metrics[schema.BEST_EPOCH])
        checkpoint = mlflow.pytorch.load_model(f"models:/{models[f'checkpoint-{best}'].model_id}")
        selected = torch.load(tracking.weights_file(run.info.run_id), weights_only=True)
        logged = checkpoint.state_dict()
        assert all(torch.equal(logged[k], v) for k, v in selected.items() if k in logged), run.info.run_name
        assert sum(k in logged for k in selected) > len(selected) / 2, sorted(logged)[:5]
