"""Calibration (NLL, ECE, Brier), the ensemble-size curve and Figure 1: the math against
torchmetrics and the definitions, and a smoke study on a real server whose every new
figure is recomputed here from the downloaded predictions artifacts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import invoke

from kd_mlflow import calibration, predictions, schema, stats


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _torchmetrics_ece(probs, labels) -> float:
    # Imported here: torchmetrics costs every pytest worker 0.7 s at collection.
    from torchmetrics.classification import MulticlassCalibrationError

    p = torch.tensor(np.asarray(probs, dtype=np.float64))
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=15, norm="l1")
    return float(metric(p, torch.tensor(np.asarray(labels, dtype=np.int64))))


def _nll_by_definition(probs, labels) -> float:
    p = torch.tensor(np.asarray(probs, dtype=np.float64)).clamp_min(calibration.NLL_EPS)
    return float(torch.nn.functional.nll_loss(p.log(), torch.tensor(np.asarray(labels, dtype=np.int64))))


def _exact_nll(p) -> np.ndarray:
    """Each test image's NLL from the float32 log-probability of its label that the
    predictions file keeps beside the float16 probabilities (format 3)."""
    assert p.has_log_probs
    return -p.logp_label("test").astype(np.float64)


def _brier_by_definition(probs, labels) -> float:
    p = torch.tensor(np.asarray(probs, dtype=np.float64))
    onehot = torch.nn.functional.one_hot(torch.tensor(np.asarray(labels, dtype=np.int64)), p.shape[1])
    return float(((p - onehot) ** 2).sum(1).mean())


HAND_MADE = (
    # confidence exactly 1 (float16 rounds every p > 1 - 2**-12 to it), right and wrong
    (np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]]), np.array([0, 1, 2, 0, 1])),
    # every image in one bin, all right: ECE = 1 - mean confidence
    (np.array([[0.9, 0.05, 0.05], [0.05, 0.92, 0.03]]), np.array([0, 1])),
    # uniform rows: confidence 1/C, argmax the first class
    (np.full((4, 4), 0.25), np.array([0, 1, 2, 3])),
)


@pytest.mark.parametrize("probs, labels", HAND_MADE)
def test_calibration_of_hand_made_probabilities_is_torchmetrics_and_the_definitions(probs, labels):
    got = calibration.measure(probs, labels)
    assert got.ece == pytest.approx(_torchmetrics_ece(probs, labels), abs=1e-6)
    assert got.nll == pytest.approx(_nll_by_definition(probs, labels), rel=1e-12)
    assert got.brier == pytest.approx(_brier_by_definition(probs, labels), rel=1e-12)


def test_hand_made_values():
    probs, labels = HAND_MADE[1]
    assert calibration.ece(probs, labels) == pytest.approx(1 - 0.91)
    assert calibration.brier(probs, labels) == pytest.approx((0.1**2 + 2 * 0.05**2 + 0.08**2 + 0.05**2 + 0.03**2) / 2)
    assert calibration.nll(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(-math.log(calibration.NLL_EPS))


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_of_random_probabilities_is_torchmetrics_and_the_definitions(dtype, seed):
    rng = np.random.default_rng(seed)
    probs = _softmax(rng.normal(size=(2000, 10)) * rng.uniform(0.5, 6)).astype(dtype)
    labels = rng.integers(0, 10, 2000)
    got = calibration.measure(probs, labels)
    assert got.ece == pytest.approx(_torchmetrics_ece(probs, labels), abs=1e-6)
    assert got.nll == pytest.approx(_nll_by_definition(probs, labels), rel=1e-12)
    assert got.brier == pytest.approx(_brier_by_definition(probs, labels), rel=1e-12)
    assert got.as_metrics() == {"test_nll": got.nll, "test_ece": got.ece, "test_brier": got.brier}


def test_subset_rule_all_subsets_up_to_200_else_200_distinct_seeded():
    for n in range(1, 11):
        for k in range(1, n + 1):
            got = calibration.subsets(n, k)
            assert len(got) == min(math.comb(n, k), 200) == len(set(got))
            assert all(len(s) == k and list(s) == sorted(set(s)) and s[-1] < n for s in got)
            if math.comb(n, k) <= 200:
                assert got == list(combinations(range(n), k))
            assert calibration.subsets(n, k, seed=0) == got
    assert calibration.subsets(10, 5, seed=1) != calibration.subsets(10, 5, seed=0)
    assert len(calibration.subsets(12, 6, max_subsets=50)) == 50
    with pytest.raises(ValueError, match="k must be"):
        calibration.subsets(3, 4)


def test_ensemble_size_ends_at_the_mean_single_and_the_ensemble():
    rng = np.random.default_rng(3)
    n, images, classes = 5, 300, 4
    probs = _softmax(rng.normal(size=(n * images, classes)) * 2).reshape(n, images, classes)
    labels = rng.integers(0, classes, images)
    stored = probs.argmax(axis=2)
    curve = calibration.ensemble_size(probs, labels, stored)
    assert [r["k"] for r in curve] == list(range(1, n + 1))
    assert [r["n_subsets"] for r in curve] == [math.comb(n, k) for k in range(1, n + 1)]
    one, whole = curve[0], curve[-1]
    assert one["acc_mean"] == pytest.approx(100 * (stored == labels).mean(axis=1).mean())
    assert one["acc_min"] == 100 * (stored == labels).mean(axis=1).min()
    ensemble = probs.mean(axis=0)
    assert whole["acc_mean"] == whole["acc_min"] == whole["acc_max"] == 100 * (ensemble.argmax(1) == labels).mean()
    assert whole["nll_mean"] == pytest.approx(_nll_by_definition(ensemble, labels))
    assert all(r["acc_min"] <= r["acc_mean"] <= r["acc_max"] for r in curve)


def test_paired_bootstrap_of_values_is_the_direct_paired_resampling():
    """paired_bootstrap_values against its definition, written here one resample at a
    time from the same seeded stream (one draw of every resample's images): on real
    values (NLL-like) of a group of three runs and of one run, each resample takes the
    same images for both sides, a side is the mean of its runs' means, the gain is b's
    minus a's, the interval the 2.5th and 97.5th percentiles of the gains."""
    rng = np.random.default_rng(5)
    a, b = rng.exponential(1.0, (3, 50)), rng.exponential(0.8, 50)
    got = stats.paired_bootstrap_values(a, b, n_resamples=300, seed=2)
    images = np.random.default_rng(2).integers(0, 50, size=(300, 50))
    gains = [np.mean([b[i] for i in r]) - np.mean([np.mean([run[i] for i in r]) for run in a]) for r in images]
    assert (got.lo, got.hi) == pytest.approx(tuple(np.percentile(gains, [2.5, 97.5])), abs=1e-12)
    assert got.estimate == pytest.approx(b.mean() - a.mean(), abs=1e-12) and got.n_resamples == 300


def _records(joint_recipe: dict):
    """Two train runs of smoke and a joint run of ``joint_recipe`` (record_of's view)."""
    from kd_mlflow import config
    from kd_mlflow.runs import RunRecord

    params = config.preset("smoke").as_params("train")
    common = {"status": "FINISHED", "preset": "smoke", "dataset": "digits", "split_digest": "s", "group": "g"}
    trains = [
        RunRecord(f"t{s}", role="train", seed=s, params=params, final_test_acc=80.0 + s, config_hash=f"t{s}", **common)
        for s in (0, 1)
    ]
    joint = RunRecord(
        "j",
        role="joint",
        params={**params, **joint_recipe},
        member_seeds=("0", "1"),
        final_val_acc=70.0,
        final_test_acc=79.0,
        config_hash="j",
        **{**common, "group": "joint-group"},
    )
    return [*trains, joint]


def test_a_joint_run_is_the_fifth_column_of_its_train_recipes_figure1():
    from kd_mlflow import compare
    from kd_mlflow.runs import records_frame

    (t,) = compare.build_tables(records_frame(_records({})))
    fig = t.figure1.set_index("column")
    assert fig.loc["joint", "run_ids"] == ["j"] and fig.loc["joint", "test_acc"] == 79.0
    assert fig.loc["joint", "gain"] == pytest.approx(79.0 - 80.5)
    assert t.joint[["members", "n_members", "test_acc", "run_id"]].values.tolist() == [["0,1", 2, 79.0, "j"]]
    # Of another recipe (here another epoch count) it has no train runs here: listed, with
    # a note, and counted in no Figure 1 (with one train group, in its table, as compare
    # lists every run whose line is not here).
    (t,) = compare.build_tables(records_frame(_records({"epochs": "3"})))
    assert t.figure1.set_index("column").loc["joint", "n"] == 0
    assert t.joint["run_id"].tolist() == ["j"] and "no train runs of its recipe and split" in "\n".join(t.notes)
    assert 'j,joint,"0,1",70.0,79.0,smoke,' in compare.render([t], "csv")


@pytest.mark.e2e  # a fresh interpreter
def test_compare_and_its_measures_load_no_torch():
    code = "import sys, kd_mlflow.compare; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": repo}
    )
    assert out.stdout.strip() == "[]"


# --- on a real server -------------------------------------------------------------------


def _load(client, run_id):
    return predictions.load(client.download_artifacts(run_id, schema.PREDICTIONS_PATH))


def _group(doc: dict, section: str) -> list[dict]:
    (group,) = {r["group_id"] for r in doc["summary"]}
    return [r for r in doc[section] if r["group_id"] == group]


def test_every_new_figure_is_recomputed_from_the_artifacts(smoke_study, tmp_path):
    client = mlflow.MlflowClient(smoke_study.server.uri)
    steps = {name: client.get_run(rid) for name, rid in smoke_study.steps.items()}
    preds = {name: _load(client, r.info.run_id) for name, r in steps.items()}
    parent = client.get_run(smoke_study.parent_run_id)
    doc = json.loads(open(client.download_artifacts(parent.info.run_id, "tables.json", str(tmp_path))).read())

    # Every run logged its calibration, computed from what its artifact holds.
    for name, run in steps.items():
        p = preds[name]
        assert run.data.metrics["test_ece"] == pytest.approx(_torchmetrics_ece(p.probs(), p.labels()), abs=1e-6)
        assert run.data.metrics["test_nll"] == pytest.approx(_exact_nll(p).mean(), rel=1e-6)
        assert run.data.metrics["test_brier"] == pytest.approx(_brier_by_definition(p.probs(), p.labels()), rel=1e-9)

    singles, ens, kd = ["train-seed-0", "train-seed-1"], "ensemble-seeds-0-1", "kd-seed-100"
    sds = ["sd-t0-s10", "sd-t1-s11"]
    acc = {name: run.data.metrics[schema.FINAL_TEST_ACC] for name, run in steps.items()}
    mean_single = np.mean([acc[s] for s in singles])
    correct = np.stack([preds[s].correct() for s in singles])
    fig = {r["column"]: r for r in _group(doc, "figure1")}
    assert list(fig) == ["single", "ensemble", "kd", "sd", "joint"]
    for column, names in (("single", singles), ("ensemble", [ens]), ("kd", [kd]), ("sd", sds)):
        assert fig[column]["test_acc"] == pytest.approx(np.mean([acc[n] for n in names]))
        assert fig[column]["run_ids"] == [steps[n].info.run_id for n in names]
        if column == "sd":  # each student paired with its teacher, over seeds and images
            side = np.stack([preds[n].correct() for n in names])
            again = stats.hierarchical_bootstrap(correct, side, paired=True, scale=100.0)
        elif column != "single":
            again = stats.paired_bootstrap(correct, np.stack([preds[n].correct() for n in names]))
            assert fig[column]["gain"] == pytest.approx(fig[column]["test_acc"] - mean_single)
            assert (fig[column]["gain_lo"], fig[column]["gain_hi"]) == pytest.approx((again.lo, again.hi))
    over_seeds = stats.seed_interval([acc[s] for s in singles])
    assert (fig["single"]["seed_lo"], fig["single"]["seed_hi"]) == pytest.approx((over_seeds.lo, over_seeds.hi))
    assert fig["joint"]["n"] == 0 and fig["joint"]["test_acc"] is None
    assert fig["single"]["report"] is None and fig["single"]["paper"] is None  # smoke is not their recipe

    cal = {r["row"]: r for r in _group(doc, "calibration")}
    for row, names in (("single models (mean)", singles), ("ensemble", [ens]), ("KD students", [kd])):
        for key, reference in (("ece", _torchmetrics_ece), ("brier", _brier_by_definition)):
            want = np.mean([reference(preds[n].probs(), preds[n].labels()) for n in names])
            assert cal[row][key] == pytest.approx(want, abs=1e-6), (row, key)
        want = np.mean([_exact_nll(preds[n]).mean() for n in names])  # not the float16 probabilities' floored one
        assert cal[row]["nll"] == pytest.approx(want, abs=1e-6), row
    nll = {n: _exact_nll(preds[n]) for n in preds}
    for row, name in (("ensemble", ens), ("KD students", kd)):
        again = stats.paired_bootstrap_values(nll[name], np.stack([nll[s] for s in singles]))
        assert (cal[row]["nll_gain"], cal[row]["nll_gain_lo"], cal[row]["nll_gain_hi"]) == pytest.approx(
            (again.estimate, again.lo, again.hi)
        )
    assert "training the average" not in cal

    size = {r["k"]: r for r in _group(doc, "ensemble_size")}
    assert sorted(size) == [1, 2] and [size[k]["n_subsets"] for k in (1, 2)] == [2, 1]
    assert size[1]["acc_mean"] == pytest.approx(mean_single)
    assert size[2]["acc_mean"] == pytest.approx(acc[ens])
    logp = [preds[s].logp_label("test").astype(np.float64) for s in singles]  # the mean of the members' p(label)
    assert size[2]["nll_mean"] == pytest.approx(-(np.logaddexp(*logp) - np.log(2)).mean())

    metrics = parent.data.metrics
    assert metrics["ensemble_nll"] == cal["ensemble"]["nll"] and metrics["kd_nll"] == cal["KD students"]["nll"]
    assert metrics["single_nll_mean"] == cal["single models (mean)"]["nll"]
    assert "joint_test_acc" not in metrics and "joint_gain" not in metrics
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"figure1.png", "reliability.png", "ensemble_size.png"} <= names


def _copy_run(client, run, experiment_id: str) -> str:
    """A run of the smoke study logged again by hand in another experiment: its params,
    kd tags, results and predictions artifact."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("kd.")}
    new = client.create_run(experiment_id, run_name=run.info.run_name, tags=tags).info.run_id
    for k, v in run.data.params.items():
        client.log_param(new, k, v)
    for k in (schema.FINAL_VAL_ACC, schema.FINAL_TEST_ACC):
        client.log_metric(new, k, run.data.metrics[k])
    path = client.download_artifacts(run.info.run_id, schema.PREDICTIONS_PATH)
    client.log_artifact(new, path, "predictions")
    client.set_terminated(new, "FINISHED")
    return new


def test_the_joint_column_reads_a_joint_run(smoke_study, tracked, tmp_path):
    """A joint run (the `joint` branch's role, made here by hand on the real server with
    the predictions writer) fills Figure 1's fifth column and a calibration row."""
    client = tracked.client
    exp = client.create_experiment(tracked.experiment)
    source = {n: client.get_run(smoke_study.steps[n]) for n in ("train-seed-0", "train-seed-1")}
    trains = [_copy_run(client, run, exp) for run in source.values()]
    members = [_load(client, run.info.run_id) for run in source.values()]
    # Its probabilities: the members' average, a stand-in for a jointly trained model's.
    probs_val, probs_test = (np.mean([m.probs(s).astype(np.float64) for m in members], axis=0) for s in ("val", "test"))
    labels_val, labels_test = members[0].labels("val"), members[0].labels("test")
    pred_val, pred_test = probs_val.argmax(1), probs_test.argmax(1)
    path = predictions.save(
        tmp_path / "predictions.npz",
        probs_val,
        probs_test,
        labels_val,
        labels_test,
        pred_val=pred_val,
        pred_test=pred_test,
    )
    train = source["train-seed-0"].data
    tags = {
        k: v
        for k, v in train.tags.items()
        if k in (schema.PRESET, schema.DATASET, schema.SPLIT_DIGEST, schema.NUM_CLASSES)
    }
    tags |= {
        schema.ROLE: "joint",
        schema.MEMBER_SEEDS: "0,1",
        schema.CONFIG_HASH: "joint-by-hand",
        schema.GROUP: "joint-by-hand",
    }
    joint = client.create_run(
        exp, run_name="joint-seeds-0-1", tags={**tags, schema.PREDICTIONS: schema.PREDICTIONS_PATH}
    )
    rid = joint.info.run_id
    for k, v in train.params.items():
        if k != "seed":
            client.log_param(rid, k, v)
    test_acc = 100 * float((pred_test == labels_test).mean())
    client.log_metric(rid, schema.FINAL_TEST_ACC, test_acc)
    client.log_metric(rid, schema.FINAL_VAL_ACC, 100 * float((pred_val == labels_val).mean()))
    client.log_artifact(rid, str(path), "predictions")
    client.set_terminated(rid, "FINISHED")

    res = invoke("compare", "--experiment", tracked.experiment, "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {r["group"] for r in doc["summary"]} == {"smoke"}  # one group: the joint run is placed with its trains
    fig = {r["column"]: r for r in doc["figure1"]}
    mean_single = np.mean([r.data.metrics[schema.FINAL_TEST_ACC] for r in source.values()])
    assert fig["joint"]["run_ids"] == [rid] and fig["joint"]["test_acc"] == pytest.approx(test_acc)
    assert fig["joint"]["gain"] == pytest.approx(test_acc - mean_single)
    again = stats.paired_bootstrap(np.stack([m.correct() for m in members]), pred_test == labels_test)
    assert (fig["joint"]["gain_lo"], fig["joint"]["gain_hi"]) == pytest.approx((again.lo, again.hi))
    (row,) = [r for r in doc["calibration"] if r["row"] == "training the average"]
    stored = predictions.stored(probs_test)
    # exact: the file keeps the float32 log of the float64 probabilities it was given
    assert row["nll"] == pytest.approx(_nll_by_definition(probs_test, labels_test))
    assert row["ece"] == pytest.approx(_torchmetrics_ece(stored, labels_test), abs=1e-6)
    assert [r["run_id"] for r in doc["joint"]] == [rid]

    # Runs logged without calibration (these copies, the joint run): compare only reads
    # them; backfill computes it from their artifacts and logs it on the run, once.
    for run_id in (rid, *trains):
        assert "test_nll" not in client.get_run(run_id).data.metrics
    res = invoke("backfill", "--experiment", tracked.experiment)
    assert res.exit_code == 0, res.output
    assert sorted(res.stdout.splitlines()) == sorted(
        f"run {run_id} ({client.get_run(run_id).info.run_name}): added calibration metrics" for run_id in (rid, *trains)
    )
    for run_id, p in ((rid, None), *zip(trains, members, strict=True)):
        logged = client.get_run(run_id).data.metrics
        probs, labels = (stored, labels_test) if p is None else (p.probs(), p.labels())
        assert logged["test_nll"] == pytest.approx(_nll_by_definition(probs, labels), rel=1e-9)
        assert logged["test_ece"] == pytest.approx(_torchmetrics_ece(probs, labels), abs=1e-6)
        assert logged["test_brier"] == pytest.approx(_brier_by_definition(probs, labels), rel=1e-9)

    md = invoke("compare", "--experiment", tracked.experiment).stdout
    assert "| runs | 2 | 0 | 0 | 0 | 1 |" in md


def test_figure1_plot_draws_each_kind_of_interval_as_what_it_is():
    """figure1.png: a mean over seeds with its t interval, a single run with its gain's
    bootstrap interval placed on its accuracy, each named in the legend; the report's
    range as a bar, its point as a cross; a column without runs left out."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from kd_mlflow import measures, plots

    nan = float("nan")
    rows = [
        # column, n, test_acc, test_std, seed_lo, seed_hi, gain, gain_lo, gain_hi, report, paper
        ("single", 3, 50.0, 1.0, 47.5, 52.5, nan, nan, nan, "85.46-86.39", None),
        ("ensemble", 1, 56.0, nan, nan, nan, 6.0, 5.5, 6.6, "89.07", None),
        ("kd", 1, 54.0, nan, nan, nan, 4.0, nan, nan, "87.00", None),
        ("sd", 0, nan, nan, nan, nan, nan, nan, nan, None, None),
    ]
    rows = [(r[0], r[0], *r[1:], [], []) for r in rows]  # its title, run_ids and over_run_ids
    table = pd.DataFrame(rows, columns=measures.FIGURE1_COLUMNS)
    points = {p["column"]: p for p in plots.figure1_points(table)}
    assert set(points) == {"single", "ensemble", "kd"}
    assert (points["single"]["kind"], points["single"]["lo"], points["single"]["hi"]) == ("seeds", 47.5, 52.5)
    assert points["ensemble"]["kind"] == "bootstrap"
    assert (points["ensemble"]["lo"], points["ensemble"]["hi"]) == pytest.approx((55.5, 56.6))
    assert points["kd"]["kind"] == "none" and points["kd"]["lo"] is None
    assert plots.reference_span("85.46-86.39") == (85.46, 86.39)
    assert plots.reference_span("96.70 ± 0.21") == (96.70, 96.70)
    assert plots.reference_span(None) is None

    fig = plots.figure1(table)
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        kinds = [label for _, _, label in plots.FIGURE1_KINDS.values()]
        assert sorted(legend) == sorted([*kinds, "the report's number (a range: its seeds' span)"])
        ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ticks == ["single\n(n=3)", "ensemble\n(n=1)", "kd\n(n=1)", "sd\n(n=0)"]
    finally:
        plt.close(fig)
