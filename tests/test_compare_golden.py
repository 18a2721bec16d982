"""Golden test of ``compare``: the public report's numbers go into a real MLflow
store through the fluent API and must come back as the report's tables.

MLflow is not mocked: the point is that what ``search_runs`` returns (column
names, dtypes, missing keys) is what ``build_tables`` reads.
"""
import io
import json
import os
import statistics
import time
import types

import mlflow
import pandas as pd
import pytest

from kd_mlflow import compare
from kd_mlflow import schema as S

PRESET, DATASET = "seed-report", "cifar10"
TRAIN = {0: (86.66, 86.01), 1: (86.06, 85.46), 2: (86.08, 85.71), 3: (86.38, 86.17), 4: (87.0, 86.39)}
ENSEMBLE = (89.5, 89.07)       # the report gives test only; val is ours
KD = (100, 87.39, 87.0)        # student seed, val, test
SD = {10: (0, 87.7, 86.88), 11: (1, 87.54, 86.48), 12: (2, 87.14, 86.13),
      13: (3, 86.46, 85.32), 14: (4, 87.38, 87.08)}  # student seed: teacher seed, val, test
SD_ENSEMBLE = (89.8, 89.38)
MEAN_SINGLE_TEST = 85.948


def _log(experiment_id, tags, acc=None, status="FINISHED", preset=PRESET):
    """Log one run the way kd-mlflow does; returns its run id."""
    run = mlflow.start_run(experiment_id=experiment_id)
    mlflow.set_tags({S.PRESET: preset, S.DATASET: DATASET, **tags})
    if acc is not None:
        mlflow.log_metrics({S.FINAL_VAL_ACC: acc[0], S.FINAL_TEST_ACC: acc[1]})
    mlflow.end_run(status)
    time.sleep(0.003)  # start_time has ms resolution and decides which duplicate wins
    return run.info.run_id


def _log_report(eid):
    ids = types.SimpleNamespace()
    ids.train = {s: _log(eid, {S.ROLE: "train", S.SEED: str(s), S.CONFIG_HASH: f"train-{s}"}, acc)
                 for s, acc in TRAIN.items()}
    members = ",".join(str(s) for s in TRAIN)
    ids.ensemble = _log(eid, {
        S.ROLE: "ensemble", S.MEMBER_ROLE: "train", S.MEMBER_SEEDS: members,
        S.MEMBER_RUN_IDS: ",".join(ids.train.values()), S.CONFIG_HASH: "ens"}, ENSEMBLE)
    ids.kd = _log(eid, {
        S.ROLE: "student", S.METHOD: "kd", S.SEED: str(KD[0]), S.TEACHER_RUN_ID: ids.ensemble,
        S.TEACHER_ROLE: "ensemble", S.TEACHER_SEEDS: members, S.GENERATION: "1",
        S.CONFIG_HASH: "kd-100"}, KD[1:])
    ids.sd = {s: _log(eid, {
        S.ROLE: "student", S.METHOD: "sd", S.SEED: str(s), S.TEACHER_RUN_ID: ids.train[t],
        S.TEACHER_ROLE: "train", S.TEACHER_SEEDS: str(t), S.CONFIG_HASH: f"sd-{s}"}, (v, te))
        for s, (t, v, te) in SD.items()}
    ids.sd_ensemble = _log(eid, {
        S.ROLE: "ensemble", S.MEMBER_ROLE: "student", S.MEMBER_SEEDS: ",".join(map(str, SD)),
        S.MEMBER_RUN_IDS: ",".join(ids.sd.values()), S.CONFIG_HASH: "sd-ens"}, SD_ENSEMBLE)
    return ids


def _log_noise(eid, ids):
    """Runs that must not count: failed, pointers, a study parent, another preset."""
    ids.failed = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "train-0"}, (10, 10), "FAILED")
    ids.pointer = _log(eid, {S.ROLE: "train", S.SEED: "1", S.CONFIG_HASH: "train-1",
                             S.DUPLICATE_OF: ids.train[1]}, (1, 1))
    ids.study = _log(eid, {S.ROLE: "train", S.SEED: "7", S.STUDY: "true"}, (2, 2))
    # Another preset: seed 0 twice (the later wins), no ensemble, and an SD
    # student whose teacher lives in the report's group and so is not found.
    ids.other_old = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "o-0"}, (50, 50), preset="other")
    ids.other_new = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "o-0"}, (60, 61), preset="other")
    ids.other_sd = _log(eid, {S.ROLE: "student", S.METHOD: "sd", S.SEED: "10", S.CONFIG_HASH: "o-sd",
                              S.TEACHER_RUN_ID: ids.train[0], S.TEACHER_SEEDS: "0"}, (70, 71), preset="other")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """All MLflow work, once: a sqlite store in a temp dir, read back as pandas."""
    tmp = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri mirrors itself here
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    try:
        eid = mlflow.create_experiment("study", artifact_location=(tmp / "artifacts").as_uri())
        ids = _log_report(eid)
        _log_noise(eid, ids)
        runs = mlflow.search_runs(experiment_ids=[eid], output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)
    tables = {(t.preset, t.dataset): t for t in compare.build_tables(runs)}
    return types.SimpleNamespace(runs=runs, ids=ids, tables=tables)


@pytest.fixture(scope="module")
def report(study):
    return study.tables[(PRESET, DATASET)]


def test_groups_are_separate(study):
    assert sorted(study.tables) == [("other", DATASET), (PRESET, DATASET)]
    only = compare.build_tables(study.runs, preset="other")
    assert [(t.preset, t.dataset) for t in only] == [("other", DATASET)]
    assert compare.build_tables(study.runs, dataset="cifar100") == []


def test_seed_table(report, study):
    seeds = report.seeds
    assert seeds["seed"].tolist() == list(TRAIN)
    assert list(zip(seeds["val_acc"], seeds["test_acc"])) == list(TRAIN.values())
    assert seeds["run_id"].tolist() == [study.ids.train[s] for s in TRAIN]


def test_ensembles_and_kd(report, study):
    ens = report.ensembles.iloc[0]
    assert (ens.members, ens.n_members, ens.val_acc, ens.test_acc) == ("0,1,2,3,4", 5, *ENSEMBLE)
    assert ens.run_id == study.ids.ensemble
    kd = report.kd.iloc[0]
    assert (kd.seed, kd.val_acc, kd.test_acc) == KD
    assert (kd.teacher_seeds, kd.teacher_val_acc, kd.teacher_test_acc) == ("0,1,2,3,4", *ENSEMBLE)
    assert (kd.teacher_run_id, kd.run_id) == (study.ids.ensemble, study.ids.kd)
    sd_ens = report.sd_ensembles.iloc[0]
    assert (sd_ens.members, sd_ens.val_acc, sd_ens.test_acc) == ("10,11,12,13,14", *SD_ENSEMBLE)
    assert sd_ens.run_id == study.ids.sd_ensemble


def test_self_distillation_table(report, study):
    sd = report.self_distillation
    got = sd[["teacher_seed", "teacher_val_acc", "teacher_test_acc",
              "student_seed", "student_val_acc", "student_test_acc"]]
    want = [(t, *TRAIN[t], s, v, te) for s, (t, v, te) in SD.items()]
    assert [tuple(r) for r in got.itertuples(index=False)] == want
    assert sd["gain"].tolist() == pytest.approx([te - TRAIN[t][1] for t, _, te in SD.values()])
    assert sd["run_id"].tolist() == [study.ids.sd[s] for s in SD]
    assert sd["teacher_run_id"].tolist() == [study.ids.train[t] for t, _, _ in SD.values()]


def test_summary(report, study):
    s = report.summary.set_index("row")
    single_test = [te for _, te in TRAIN.values()]
    assert s.loc["single models", "test_mean"] == pytest.approx(MEAN_SINGLE_TEST)
    assert s.loc["single models", "test_std"] == pytest.approx(statistics.stdev(single_test))
    assert s.loc["single models", "val_mean"] == pytest.approx(86.436)
    assert s.loc["single models", "run_ids"] == [study.ids.train[x] for x in TRAIN]
    assert pd.isna(s.loc["ensemble", "test_std"])  # one run: no sample std
    gains = s["gain"]
    assert gains["ensemble"] == pytest.approx(89.07 - MEAN_SINGLE_TEST)
    assert gains["KD students"] == pytest.approx(87.0 - MEAN_SINGLE_TEST)
    assert gains["SD students"] == pytest.approx(0.43)
    assert gains["SD ensemble"] == pytest.approx(89.38 - 89.07)
    assert s["n"].tolist() == [5, 1, 1, 5, 1]
    assert report.notes == []


def test_markdown(report):
    md = compare.render([report], "markdown")
    assert md.startswith("## preset=seed-report dataset=cifar10\n")
    assert "| seed | validation accuracy | test accuracy |\n| --- | --- | --- |\n| 0 | 86.66 | 86.01 |" in md
    assert "| 4 | 87.00 | 86.39 |" in md
    pair = "| seed | validation accuracy | test accuracy | seed | validation accuracy | test accuracy |"
    assert md.count(pair) == 2
    assert "| 0 | 86.66 | 86.01 | 10 | 87.70 | 86.88 |" in md
    assert "| 3 | 86.38 | 86.17 | 13 | 86.46 | 85.32 |" in md
    assert "| 0,1,2,3,4 | 89.50 | 89.07 | 100 | 87.39 | 87.00 |" in md
    assert "| ensemble | 1 | 89.50 | - | 89.07 | - | +3.12 |" in md
    assert "| 10,11,12,13,14 | 89.80 | 89.38 |" in md


def test_json(study, report):
    doc = json.loads(compare.render(list(study.tables.values()), "json"))
    assert set(doc) == {*compare.TABLES, "notes"}
    for name in compare.TABLES:
        assert all({"preset", "dataset"} <= set(row) for row in doc[name])
    mine = {name: [r for r in doc[name] if r["preset"] == PRESET] for name in doc}
    assert [(r["seed"], r["val_acc"], r["test_acc"], r["run_id"]) for r in mine["seeds"]] == [
        (s, *TRAIN[s], study.ids.train[s]) for s in TRAIN]
    assert [r["run_id"] for r in mine["self_distillation"]] == [study.ids.sd[s] for s in SD]
    assert mine["ensembles"][0]["test_acc"] == 89.07
    assert mine["kd"][0]["run_id"] == study.ids.kd
    single = mine["summary"][0]
    assert single["test_mean"] == pytest.approx(MEAN_SINGLE_TEST)
    assert single["gain"] is None and len(single["run_ids"]) == 5
    assert mine["summary"][1]["test_std"] is None  # NaN -> null


def test_csv(study):
    csv = pd.read_csv(io.StringIO(compare.render(list(study.tables.values()), "csv")))
    assert list(csv.columns[:3]) == ["table", "preset", "dataset"]
    mine = csv[(csv["preset"] == PRESET) & (csv["table"] == "seeds")]
    assert mine["test_acc"].tolist() == [te for _, te in TRAIN.values()]
    assert mine["run_id"].tolist() == [study.ids.train[s] for s in TRAIN]
    assert set(csv["table"]) == {*compare.TABLES, "notes"}


def test_ignored_runs(study, report):
    kept = set(report.seeds["run_id"])
    assert not kept & {study.ids.failed, study.ids.pointer, study.ids.study}
    assert not any(study.ids.failed in n or study.ids.pointer in n for n in report.notes)


def test_duplicate_latest_wins(study):
    other = study.tables[("other", DATASET)]
    assert other.seeds["run_id"].tolist() == [study.ids.other_new]
    assert (other.seeds["val_acc"][0], other.seeds["test_acc"][0]) == (60, 61)
    assert f"run {study.ids.other_old} superseded by {study.ids.other_new}" in "\n".join(other.notes)


def test_missing_pieces_render_as_dashes(study):
    other = study.tables[("other", DATASET)]
    assert other.ensembles.empty and "no ensemble of train runs yet" in other.notes
    md = compare.render([other], "markdown")
    assert ("### Ensemble of single models\n\n| members | validation accuracy | test accuracy |\n"
            "| --- | --- | --- |\n| - | - | - |") in md
    # The SD teacher lives in another group: groups never mix, so it is not found.
    sd = other.self_distillation.iloc[0]
    assert sd.teacher_seed == 0 and pd.isna(sd.teacher_test_acc) and pd.isna(sd.gain)
    assert any(study.ids.train[0] in n and "not a finished run" in n for n in other.notes)
    assert "| 0 | - | - | 10 | 70.00 | 71.00 |" in md
    assert "| ensemble | 0 | - | - | - | - | - | single models (mean) |" in md


def test_hand_made_frame_without_optional_columns():
    """No config hash, no val metric, no teacher column: identity decides duplicates."""
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    runs = pd.DataFrame({
        "run_id": ["a", "b", "c"],
        "status": ["FINISHED", "FINISHED", "FINISHED"],
        "start_time": [t0, t0 + pd.Timedelta("1s"), t0],
        "tags.kd.role": ["train", "train", "train"],
        "tags.kd.preset": ["p", "p", "p"],
        "tags.kd.dataset": ["d", "d", "d"],
        "params.seed": ["0", "0", "1"],
        "metrics.final_test_acc": [50.0, 51.0, 52.0],
    })
    (tables,) = compare.build_tables(runs)
    assert tables.seeds["run_id"].tolist() == ["b", "c"]
    assert any(n.startswith("run a superseded by b (same role, seed") for n in tables.notes)
    assert "| 0 | - | 51.00 |" in compare.render([tables], "markdown")
    assert json.loads(compare.render([tables], "json"))["seeds"][0]["val_acc"] is None


def test_empty_input():
    assert compare.build_tables(pd.DataFrame()) == []
    assert compare.render([], "markdown") == "no finished runs\n"
    assert json.loads(compare.render([], "json"))["seeds"] == []
    assert compare.render([], "csv").strip() == "table,preset,dataset"
    with pytest.raises(ValueError):
        compare.render([], "html")
