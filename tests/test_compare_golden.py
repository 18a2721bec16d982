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
ENSEMBLE = (89.5, 89.07)  # the report gives test only; val is ours
KD = (100, 87.39, 87.0)  # student seed, val, test
SD = {
    10: (0, 87.7, 86.88),
    11: (1, 87.54, 86.48),
    12: (2, 87.14, 86.13),
    13: (3, 86.46, 85.32),
    14: (4, 87.38, 87.08),
}  # student seed: teacher seed, val, test
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
    ids.train = {
        s: _log(eid, {S.ROLE: "train", S.SEED: str(s), S.CONFIG_HASH: f"train-{s}"}, acc) for s, acc in TRAIN.items()
    }
    members = ",".join(str(s) for s in TRAIN)
    ids.ensemble = _log(
        eid,
        {
            S.ROLE: "ensemble",
            S.MEMBER_ROLE: "train",
            S.MEMBER_SEEDS: members,
            S.MEMBER_RUN_IDS: ",".join(ids.train.values()),
            S.CONFIG_HASH: "ens",
        },
        ENSEMBLE,
    )
    ids.kd = _log(
        eid,
        {
            S.ROLE: "student",
            S.METHOD: "kd",
            S.SEED: str(KD[0]),
            S.TEACHER_RUN_ID: ids.ensemble,
            S.TEACHER_ROLE: "ensemble",
            S.TEACHER_SEEDS: members,
            S.GENERATION: "1",
            S.CONFIG_HASH: "kd-100",
        },
        KD[1:],
    )
    ids.sd = {
        s: _log(
            eid,
            {
                S.ROLE: "student",
                S.METHOD: "sd",
                S.SEED: str(s),
                S.TEACHER_RUN_ID: ids.train[t],
                S.TEACHER_ROLE: "train",
                S.TEACHER_SEEDS: str(t),
                S.CONFIG_HASH: f"sd-{s}",
            },
            (v, te),
        )
        for s, (t, v, te) in SD.items()
    }
    ids.sd_ensemble = _log(
        eid,
        {
            S.ROLE: "ensemble",
            S.MEMBER_ROLE: "student",
            S.MEMBER_SEEDS: ",".join(map(str, SD)),
            S.MEMBER_RUN_IDS: ",".join(ids.sd.values()),
            S.CONFIG_HASH: "sd-ens",
        },
        SD_ENSEMBLE,
    )
    return ids


def _log_noise(eid, ids):
    """Runs that must not count: failed, pointers, a study parent, another preset."""
    ids.failed = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "train-0"}, (10, 10), "FAILED")
    ids.pointer = _log(
        eid, {S.ROLE: "train", S.SEED: "1", S.CONFIG_HASH: "train-1", S.DUPLICATE_OF: ids.train[1]}, (1, 1)
    )
    ids.study = _log(eid, {S.ROLE: "train", S.SEED: "7", S.STUDY: "true"}, (2, 2))
    # Another preset: seed 0 twice (the later wins), no ensemble, and an SD
    # student whose teacher lives in the report's group and so is not found.
    ids.other_old = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "o-0"}, (50, 50), preset="other")
    ids.other_new = _log(eid, {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "o-0"}, (60, 61), preset="other")
    ids.other_sd = _log(
        eid,
        {
            S.ROLE: "student",
            S.METHOD: "sd",
            S.SEED: "10",
            S.CONFIG_HASH: "o-sd",
            S.TEACHER_RUN_ID: ids.train[0],
            S.TEACHER_SEEDS: "0",
        },
        (70, 71),
        preset="other",
    )


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
    assert list(zip(seeds["val_acc"], seeds["test_acc"], strict=True)) == list(TRAIN.values())
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
    got = sd[
        ["teacher_seed", "teacher_val_acc", "teacher_test_acc", "student_seed", "student_val_acc", "student_test_acc"]
    ]
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
    assert md.startswith("## seed-report (cifar10)\n")
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
        (s, *TRAIN[s], study.ids.train[s]) for s in TRAIN
    ]
    assert [r["run_id"] for r in mine["self_distillation"]] == [study.ids.sd[s] for s in SD]
    assert mine["ensembles"][0]["test_acc"] == 89.07
    assert mine["kd"][0]["run_id"] == study.ids.kd
    single = mine["summary"][0]
    assert single["test_mean"] == pytest.approx(MEAN_SINGLE_TEST)
    assert single["gain"] is None and len(single["run_ids"]) == 5
    assert mine["summary"][1]["test_std"] is None  # NaN -> null


def test_csv_is_tidy_one_row_per_run(study):
    csv = pd.read_csv(io.StringIO(compare.render(list(study.tables.values()), "csv")))
    assert list(csv.columns) == compare.CSV_COLUMNS
    mine = csv[(csv["preset"] == PRESET) & (csv["section"] == "seeds")]
    assert mine["test_acc"].tolist() == [te for _, te in TRAIN.values()]
    assert mine["run_id"].tolist() == [study.ids.train[s] for s in TRAIN]
    assert set(csv["section"]) == {"seeds", "ensembles", "kd", "self_distillation", "sd_ensembles"}
    sd = csv[(csv["preset"] == PRESET) & (csv["section"] == "self_distillation")]
    assert sd[["seed", "teacher_seed"]].values.tolist() == [[s, t] for s, (t, _, _) in SD.items()]
    # Ready to pivot: one value per (section, seed) in a group.
    wide = csv[csv["preset"] == PRESET].pivot_table(index="seed", columns="section", values="test_acc")
    assert wide.loc[13, "self_distillation"] == 85.32 and wide.loc[0, "seeds"] == 86.01


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
    assert (
        "### Ensemble of single models\n\n| members | validation accuracy | test accuracy |\n"
        "| --- | --- | --- |\n| - | - | - |"
    ) in md
    # The SD teacher lives in another group: groups never mix, so it is not found.
    sd = other.self_distillation.iloc[0]
    assert sd.teacher_seed == 0 and pd.isna(sd.teacher_test_acc) and pd.isna(sd.gain)
    assert any(study.ids.train[0] in n and "not a finished run" in n for n in other.notes)
    assert "| 0 | - | - | 10 | 70.00 | 71.00 |" in md
    assert "| ensemble | 0 | - | - | - | - | - | single models (mean) |" in md


def test_hand_made_frame_without_optional_columns():
    """No config hash, no val metric, no teacher column: identity decides duplicates."""
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "status": ["FINISHED", "FINISHED", "FINISHED"],
            "start_time": [t0, t0 + pd.Timedelta("1s"), t0],
            "tags.kd.role": ["train", "train", "train"],
            "tags.kd.preset": ["p", "p", "p"],
            "tags.kd.dataset": ["d", "d", "d"],
            "params.seed": ["0", "0", "1"],
            "metrics.final_test_acc": [50.0, 51.0, 52.0],
        }
    )
    (tables,) = compare.build_tables(runs)
    assert tables.seeds["run_id"].tolist() == ["b", "c"]
    assert any(n.startswith("run a superseded by b (same role, seed") for n in tables.notes)
    assert "| 0 | - | 51.00 |" in compare.render([tables], "markdown")
    assert json.loads(compare.render([tables], "json"))["seeds"][0]["val_acc"] is None


def test_empty_input():
    assert compare.build_tables(pd.DataFrame()) == []
    assert compare.render([], "markdown") == "no finished runs\n"
    assert json.loads(compare.render([], "json"))["seeds"] == []
    assert compare.render([], "csv").strip() == ",".join(compare.CSV_COLUMNS)
    with pytest.raises(ValueError):
        compare.render([], "html")


# --- a second set, not the report's: overrides and both combine modes -----------

MIXED = {0: (79.0, 80.0), 1: (81.0, 82.0), 2: (83.0, 84.0)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One experiment as a user fills it: a smoke study, a seed run with --epochs 1, a
    logit ensemble (with its own KD student) and a student at another temperature."""
    tmp = tmp_path_factory.mktemp("mixed")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    ids = types.SimpleNamespace()
    try:
        eid = mlflow.create_experiment("mixed", artifact_location=(tmp / "artifacts").as_uri())

        def log(tags, acc, label, group, params=None):
            run = mlflow.start_run(experiment_id=eid)
            mlflow.set_tags({S.PRESET: "smoke", S.DATASET: "digits", S.GROUP: group, S.GROUP_LABEL: label, **tags})
            mlflow.log_params(params or {})
            mlflow.log_metrics({S.FINAL_VAL_ACC: acc[0], S.FINAL_TEST_ACC: acc[1]})
            mlflow.end_run()
            time.sleep(0.003)
            return run.info.run_id

        ids.train = {
            s: log({S.ROLE: "train", S.SEED: str(s), S.CONFIG_HASH: f"t{s}"}, acc, "smoke", "g1", {"epochs": "2"})
            for s, acc in MIXED.items()
        }
        ids.short = log(
            {S.ROLE: "train", S.SEED: "0", S.CONFIG_HASH: "short"},
            (50.0, 52.09),
            "smoke · epochs=1",
            "g2",
            {"epochs": "1"},
        )
        members = {
            S.ROLE: "ensemble",
            S.MEMBER_ROLE: "train",
            S.MEMBER_SEEDS: "0,1,2",
            S.MEMBER_RUN_IDS: ",".join(ids.train.values()),
        }
        ids.prob = log({**members, S.CONFIG_HASH: "ep"}, (88.5, 88.0), "smoke", "e1", {"combine": "prob"})
        ids.logit = log(
            {**members, S.CONFIG_HASH: "el"}, (87.5, 87.0), "smoke · ensemble: logit", "e2", {"combine": "logit"}
        )
        kd = {S.ROLE: "student", S.METHOD: "kd", S.SEED: "100", S.TEACHER_SEEDS: "0,1,2"}
        ids.kd_prob = log({**kd, S.TEACHER_RUN_ID: ids.prob, S.CONFIG_HASH: "kp"}, (83.0, 83.5), "smoke", "k1")
        ids.kd_logit = log({**kd, S.TEACHER_RUN_ID: ids.logit, S.CONFIG_HASH: "kl"}, (82.0, 83.0), "smoke", "k2")
        sd = {S.ROLE: "student", S.METHOD: "sd"}
        ids.sd = {
            s: log(
                {
                    **sd,
                    S.SEED: str(s),
                    S.TEACHER_RUN_ID: ids.train[t],
                    S.TEACHER_SEEDS: str(t),
                    S.CONFIG_HASH: f"sd{s}",
                },
                acc,
                "smoke",
                "s1",
                {"temperature": "1.0"},
            )
            for s, t, acc in ((10, 0, (80.0, 81.0)), (11, 1, (82.5, 83.0)))
        }
        ids.sd_t2 = log(
            {**sd, S.SEED: "10", S.TEACHER_RUN_ID: ids.train[0], S.TEACHER_SEEDS: "0", S.CONFIG_HASH: "sdT2"},
            (78.0, 79.0),
            "smoke · temperature=2",
            "s2",
            {"temperature": "2.0"},
        )
        ids.sd_ens = log(
            {
                S.ROLE: "ensemble",
                S.MEMBER_ROLE: "student",
                S.MEMBER_SEEDS: "10,11",
                S.MEMBER_RUN_IDS: ",".join(ids.sd.values()),
                S.CONFIG_HASH: "se",
            },
            (85.5, 86.0),
            "smoke",
            "e3",
            {"combine": "prob"},
        )
        runs = mlflow.search_runs(experiment_ids=[eid], output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)
    return types.SimpleNamespace(runs=runs, ids=ids, tables={t.label: t for t in compare.build_tables(runs)})


def _run_ids(t):
    return {
        *t.seeds["run_id"],
        *t.ensembles["run_id"],
        *t.kd["run_id"],
        *t.self_distillation["run_id"],
        *t.sd_ensembles["run_id"],
    }


def test_mixed_runs_never_share_a_table(mixed):
    ids, tables = mixed.ids, mixed.tables
    assert set(tables) == {
        "smoke",
        "smoke · epochs=1",
        "smoke · ensemble: logit",
        "smoke · students: temperature=2",
        "smoke · ensemble: logit · students: temperature=2",
    }
    main = tables["smoke"]
    assert _run_ids(main) == {*ids.train.values(), ids.prob, ids.kd_prob, *ids.sd.values(), ids.sd_ens}
    assert _run_ids(tables["smoke · epochs=1"]) == {ids.short}
    assert _run_ids(tables["smoke · ensemble: logit"]) == {
        *ids.train.values(),
        ids.logit,
        ids.kd_logit,
        *ids.sd.values(),
    }
    assert _run_ids(tables["smoke · students: temperature=2"]) == {*ids.train.values(), ids.prob, ids.sd_t2}
    s = main.summary.set_index("row")
    assert s.loc["single models", "n"] == 3 and s.loc["single models", "test_mean"] == pytest.approx(82.0)
    assert s.loc["single models", "test_std"] == pytest.approx(2.0)
    assert s.loc["ensemble", "gain"] == pytest.approx(6.0)
    assert s.loc["KD students", "gain"] == pytest.approx(1.5)
    assert s.loc["SD students", "gain"] == pytest.approx(((81 - 80) + (83 - 82)) / 2)
    assert tables["smoke · ensemble: logit"].summary.set_index("row").loc["ensemble", "gain"] == pytest.approx(5.0)
    assert tables["smoke · students: temperature=2"].self_distillation["gain"].tolist() == [-1.0]


def test_mixed_numbers_are_the_metrics_of_the_runs_they_name(mixed):
    by_id = mixed.runs.set_index("run_id")
    for t in mixed.tables.values():
        for frame, col in (
            (t.seeds, "test_acc"),
            (t.ensembles, "test_acc"),
            (t.kd, "test_acc"),
            (t.self_distillation, "student_test_acc"),
            (t.sd_ensembles, "test_acc"),
        ):
            for run_id, value in zip(frame["run_id"], frame[col], strict=True):
                assert by_id.loc[run_id, f"metrics.{S.FINAL_TEST_ACC}"] == value


def test_mixed_json_rows_carry_label_and_recipe_and_group_filter(mixed):
    doc = json.loads(compare.render(list(mixed.tables.values()), "json"))
    short = [r for r in doc["seeds"] if r["group"] == "smoke · epochs=1"]
    assert len(short) == 1 and short[0]["recipe"]["epochs"] == "1" and short[0]["test_acc"] == 52.09
    assert {r["group"] for r in doc["ensembles"]} >= {"smoke", "smoke · ensemble: logit"}
    picked = compare.build_tables(mixed.runs, group="smoke · epochs")
    assert [t.label for t in picked] == ["smoke · epochs=1"]
    md = compare.render(picked, "markdown")
    assert md.startswith("## smoke · epochs=1 (digits)") and "52.09" in md and "80.00" not in md


def test_a_student_without_its_teacher_is_listed_and_counted_in_neither():
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "s1", "s2"],
            "status": ["FINISHED"] * 4,
            "start_time": [t0] * 4,
            "tags.kd.role": ["train", "train", "student", "student"],
            "tags.kd.method": [None, None, "sd", "sd"],
            "tags.kd.preset": ["p"] * 4,
            "tags.kd.dataset": ["d"] * 4,
            "tags.kd.seed": ["0", "1", "10", "11"],
            "tags.kd.teacher_run_id": [None, None, "a", "gone"],
            "tags.kd.teacher_seeds": [None, None, "0", "1"],
            "metrics.final_test_acc": [50.0, 60.0, 52.0, 99.0],
        }
    )
    (t,) = compare.build_tables(runs)
    assert t.self_distillation["run_id"].tolist() == ["s1", "s2"]
    s = t.summary.set_index("row")
    assert s.loc["SD students", "n"] == 1
    assert s.loc["SD students", "test_mean"] == 52.0 and s.loc["SD students", "gain"] == 2.0
    assert any("gone" in n and "counted in no mean or gain" in n for n in t.notes)
