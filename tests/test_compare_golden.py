"""Golden test of ``compare``: the public report's numbers as RunRecords (what
``runs.record_of`` reads from a logged run) must come back as the report's tables.

The records go through ``runs.records_frame``, compare's one input; the path from a
tracking server through ``record_of`` is tested in tests/test_one_reading.py.
"""

import dataclasses
import io
import itertools
import json
import statistics
import types

import numpy as np
import pandas as pd
import pytest
from conftest import E2E_REASONS

from kd_mlflow import compare, config, schema
from kd_mlflow import gains as gains_mod
from kd_mlflow import tables as specs
from kd_mlflow.runs import RunRecord, records_frame

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

_clock = itertools.count(1_700_000_000_000)  # start times: each record later than the last


def _params(preset: str, role: str, **over) -> dict:
    """The params a run of ``role`` logs: its recipe's fields (a teacher's never hold
    the distillation settings), as strings."""
    if preset not in config.PRESETS:
        return {}
    recipe = config.preset(preset).replace(**over)
    return recipe.as_params("student" if role == "student" else "train")


def _record(run_id, role, acc=None, *, status="FINISHED", preset=PRESET, params=None, **fields) -> RunRecord:
    """A run as record_of reads it; ``acc``: (final_val_acc, final_test_acc)."""
    val, test = acc if acc is not None else (None, None)
    fields.setdefault("group", "g")  # a train run's group: its recipe and split (kd.group)
    return RunRecord(
        run_id=run_id,
        status=status,
        role=role,
        preset=preset,
        dataset=fields.pop("dataset", DATASET),
        start_time=next(_clock),
        params=_params(preset, role) if params is None else params,
        final_val_acc=val,
        final_test_acc=test,
        **fields,
    )


def _report_records():
    ids = types.SimpleNamespace()
    recs = [_record(f"train-{s}", "train", acc, seed=s, config_hash=f"train-{s}") for s, acc in TRAIN.items()]
    ids.train = {s: f"train-{s}" for s in TRAIN}
    members = tuple(str(s) for s in TRAIN)
    ids.ensemble = "ens"
    recs.append(
        _record(
            "ens",
            "ensemble",
            ENSEMBLE,
            member_role="train",
            member_seeds=members,
            member_run_ids=tuple(ids.train.values()),
            combine="prob",
            config_hash="ens",
        )
    )
    ids.kd = "kd-100"
    recs.append(
        _record(
            "kd-100",
            "student",
            KD[1:],
            method="kd",
            seed=KD[0],
            teacher_run_id="ens",
            teacher_seeds=",".join(members),
            generation=1,
            config_hash="kd-100",
        )
    )
    ids.sd = {s: f"sd-{s}" for s in SD}
    recs += [
        _record(
            f"sd-{s}",
            "student",
            (v, te),
            method="sd",
            seed=s,
            teacher_run_id=ids.train[t],
            teacher_seeds=str(t),
            generation=1,
            config_hash=f"sd-{s}",
        )
        for s, (t, v, te) in SD.items()
    ]
    ids.sd_ensemble = "sd-ens"
    recs.append(
        _record(
            "sd-ens",
            "ensemble",
            SD_ENSEMBLE,
            member_role="student",
            member_seeds=tuple(map(str, SD)),
            member_run_ids=tuple(ids.sd.values()),
            combine="prob",
            config_hash="sd-ens",
        )
    )
    return recs, ids


def _noise_records(ids):
    """Runs that must not count: failed, pointers, a study parent, another preset."""
    ids.failed, ids.pointer, ids.study = "failed", "pointer", "study"
    ids.other_old, ids.other_new, ids.other_sd = "o-old", "o-new", "o-sd"
    return [
        _record("failed", "train", (10, 10), status="FAILED", seed=0, config_hash="train-0"),
        _record("pointer", "train", (1, 1), seed=1, config_hash="train-1", duplicate_of=ids.train[1]),
        _record("study", "train", (2, 2), seed=7, study=True),
        # Another preset: seed 0 twice (the later wins), no ensemble, and an SD
        # student whose teacher lives in the report's group and so is not found.
        _record("o-old", "train", (50, 50), seed=0, config_hash="o-0", preset="other"),
        _record("o-new", "train", (60, 61), seed=0, config_hash="o-0", preset="other"),
        _record(
            "o-sd",
            "student",
            (70, 71),
            method="sd",
            seed=10,
            config_hash="o-sd",
            teacher_run_id=ids.train[0],
            teacher_seeds="0",
            preset="other",
        ),
    ]


@pytest.fixture(scope="module")
def study():
    recs, ids = _report_records()
    runs = records_frame(recs + _noise_records(ids))
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


def test_csv_runs_table_is_one_row_per_run(study):
    """``--format csv``: the per-run table, each run with its own columns only."""
    csv = pd.read_csv(io.StringIO(compare.render(list(study.tables.values()), "csv")))
    assert list(csv.columns) == [*specs.RUN_COLUMNS, *specs.GROUP]
    mine = csv[(csv["preset"] == PRESET) & (csv["table"] == "seeds")]
    assert mine["test_acc"].tolist() == [te for _, te in TRAIN.values()]
    assert mine["run_id"].tolist() == [study.ids.train[s] for s in TRAIN]
    assert set(csv["table"]) == {"seeds", "ensembles", "kd", "self_distillation", "sd_ensembles"}
    sd = csv[(csv["preset"] == PRESET) & (csv["table"] == "self_distillation")]
    assert sd[["seeds", "val_acc", "test_acc"]].values.tolist() == [[str(s), v, te] for s, (_, v, te) in SD.items()]
    assert csv.loc[csv["run_id"] == study.ids.ensemble, "seeds"].tolist() == ["0,1,2,3,4"]
    assert not csv.drop(columns="val_acc").isna().any().any()  # (the "other" preset's val is its own)


def test_csv_runs_table_lists_a_run_once_however_many_tables_list_it(mixed):
    """Train runs are every table of their line's baselines: in the per-run CSV, once."""
    tables = list(mixed.tables.values())
    listed = [r for t in tables for name in specs.OF_RUNS if name != "alone" for r in getattr(t, name)["run_id"]]
    assert len(listed) > len(set(listed))  # the fixture lists some runs in several tables
    csv = pd.read_csv(io.StringIO(compare.render(tables, "csv")))
    assert sorted(csv["run_id"]) == sorted(set(listed))


def test_csv_of_each_table_has_its_columns_and_rows(mixed):
    """``--table NAME``: one table of every group, with the columns its declaration names
    (no empty column of another table's) and the JSON's rows."""
    tables = list(mixed.tables.values())
    doc = json.loads(compare.render(tables, "json"))
    assert set(specs.CSV_TABLES) == {specs.RUNS, *doc}
    for name, spec in specs.SPECS.items():
        frame = pd.read_csv(io.StringIO(compare.render(tables, "csv", name)), dtype=str, keep_default_na=False)
        assert list(frame.columns) == [*spec.names, *specs.GROUP], name
        assert frame["group_id"].tolist() == [r["group_id"] for r in doc[name]], name
    summary = pd.read_csv(io.StringIO(compare.render(tables, "csv", "summary")))
    want = [float("nan") if r["test_mean"] is None else r["test_mean"] for r in doc["summary"]]
    assert summary["test_mean"].tolist() == pytest.approx(want, nan_ok=True)
    assert summary["run_ids"].iloc[0].split(";") == doc["summary"][0]["run_ids"]


def test_one_declaration_drives_markdown_csv_and_json(report, monkeypatch):
    """A new column is one line in its table's declaration plus its value."""
    seeds = specs.SPECS["seeds"]
    wider = dataclasses.replace(seeds, columns=(*seeds.columns, specs.Col("twice", "twice test", ".1f")))
    monkeypatch.setitem(specs.SPECS, "seeds", wider)
    t = dataclasses.replace(report, seeds=report.seeds.assign(twice=2 * report.seeds["test_acc"]))
    md = compare.render([t], "markdown")
    assert "| seed | validation accuracy | test accuracy | twice test |\n| --- | --- | --- | --- |" in md
    assert "| 0 | 86.66 | 86.01 | 172.0 |" in md
    assert pd.read_csv(io.StringIO(compare.render([t], "csv", "seeds")))["twice"].iloc[0] == 172.02
    assert json.loads(compare.render([t], "json"))["seeds"][0]["twice"] == 172.02


def test_an_unknown_table_is_refused_with_the_names_there_are():
    with pytest.raises(config.ConfigError) as e:
        specs.check_table("csv", "sumary")
    assert e.value.name == "table" and "'sumary'" in str(e.value) and "summary, " in str(e.value)
    with pytest.raises(config.ConfigError):
        specs.check_table("markdown", "summary")
    specs.check_table("csv", "runs")


def test_figure1_is_the_summary_beside_the_reports_numbers(study, report):
    fig = report.figure1.set_index("column")
    assert list(fig.index) == ["single", "ensemble", "kd", "sd", "joint"]
    assert fig["test_acc"].tolist()[:4] == pytest.approx([MEAN_SINGLE_TEST, 89.07, 87.0, 86.378])
    assert fig["n"].tolist() == [5, 1, 1, 5, 0] and pd.isna(fig.loc["joint", "test_acc"])
    assert fig["gain"].tolist()[1:4] == pytest.approx([89.07 - MEAN_SINGLE_TEST, 87.0 - MEAN_SINGLE_TEST, 0.43])
    single = [te for _, te in TRAIN.values()]
    assert fig.loc["single", "test_std"] == pytest.approx(statistics.stdev(single))
    half = 2.7764451051977987 * statistics.stdev(single) / 5**0.5  # t(0.975, 4)
    assert (fig.loc["single", "seed_lo"], fig.loc["single", "seed_hi"]) == pytest.approx(
        (MEAN_SINGLE_TEST - half, MEAN_SINGLE_TEST + half)
    )
    assert fig["report"].tolist()[:4] == ["85.46-86.39", "89.07", "87.00", "85.32-87.08"]
    assert fig["paper"].isna().all()  # the paper's WRN-28-10 numbers only beside wrn-paper's recipe
    assert study.tables[("other", DATASET)].figure1["report"].isna().all()  # not the report's recipe
    md = compare.render([report], "markdown")
    assert "| runs | 5 | 1 | 1 | 5 | 0 |" in md
    assert "| the report (ResNet-18, CIFAR-10) | 85.46-86.39 | 89.07 | 87.00 | 85.32-87.08 | - |" in md
    assert "| test accuracy (mean ± std [95% t over seeds]) | 85.95 ± 0.37 [85.49, 86.41] | 89.07 | 87.00 |" in md
    rows = [r for r in json.loads(compare.render([report], "json"))["figure1"]]
    assert [r["column"] for r in rows] == list(fig.index) and rows[4]["test_acc"] is None


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


def test_hand_made_records_without_optional_fields():
    """No config hash, no val metric, no params: identity decides duplicates."""
    t0 = 1_704_067_200_000
    common = {"role": "train", "preset": "p", "dataset": "d", "group": "g"}
    recs = [
        RunRecord("a", seed=0, start_time=t0, final_test_acc=50.0, **common),
        RunRecord("b", seed=0, start_time=t0 + 1000, final_test_acc=51.0, **common),
        RunRecord("c", seed=1, start_time=t0, final_test_acc=52.0, **common),
    ]
    (tables,) = compare.build_tables(records_frame(recs))
    assert tables.seeds["run_id"].tolist() == ["b", "c"]
    assert any(n.startswith("run a superseded by b (same role, seed") for n in tables.notes)
    assert "| 0 | - | 51.00 |" in compare.render([tables], "markdown")
    assert json.loads(compare.render([tables], "json"))["seeds"][0]["val_acc"] is None


def test_empty_input():
    assert compare.build_tables(pd.DataFrame()) == []
    assert compare.build_tables(records_frame([])) == []
    assert compare.render([], "markdown") == "no finished runs\n"
    assert json.loads(compare.render([], "json"))["seeds"] == []
    assert compare.render([], "csv").strip() == ",".join([*specs.RUN_COLUMNS, *specs.GROUP])
    with pytest.raises(ValueError):
        compare.render([], "html")


# --- a second set, not the report's: overrides and both combine modes -----------

MIXED = {0: (79.0, 80.0), 1: (81.0, 82.0), 2: (83.0, 84.0)}


@pytest.fixture(scope="module")
def mixed():
    """One experiment as a user fills it: a smoke study, a seed run with --epochs 1, a
    logit ensemble (with its own KD student) and a student at another temperature."""
    ids = types.SimpleNamespace()
    base = {"preset": "smoke", "dataset": "digits"}

    def rec(run_id, role, acc, label, group, **fields):
        return _record(run_id, role, acc, group=group, group_label=label, **base, **fields)

    recs = [
        rec(f"t{s}", "train", acc, "smoke", "g1", seed=s, config_hash=f"t{s}", params=_params("smoke", "train"))
        for s, acc in MIXED.items()
    ]
    ids.train = {s: f"t{s}" for s in MIXED}
    ids.short = "short"
    recs.append(
        rec(
            "short",
            "train",
            (50.0, 52.09),
            "smoke · epochs=1",
            "g2",
            seed=0,
            config_hash="short",
            params=_params("smoke", "train", epochs=1),
        )
    )
    members = {
        "member_role": "train",
        "member_seeds": ("0", "1", "2"),
        "member_run_ids": tuple(ids.train.values()),
        "params": _params("smoke", "train"),
    }
    ids.prob, ids.logit = "prob", "logit"
    recs.append(rec("prob", "ensemble", (88.5, 88.0), "smoke", "e1", **members, combine="prob", config_hash="ep"))
    recs.append(
        rec(
            "logit",
            "ensemble",
            (87.5, 87.0),
            "smoke · ensemble: logit",
            "e2",
            **members,
            combine="logit",
            config_hash="el",
        )
    )
    kd = {"method": "kd", "seed": 100, "teacher_seeds": "0,1,2", "params": _params("smoke", "student")}
    ids.kd_prob, ids.kd_logit = "kd-prob", "kd-logit"
    recs.append(rec("kd-prob", "student", (83.0, 83.5), "smoke", "k1", **kd, teacher_run_id="prob", config_hash="kp"))
    recs.append(rec("kd-logit", "student", (82.0, 83.0), "smoke", "k2", **kd, teacher_run_id="logit", config_hash="kl"))
    ids.sd = {10: "sd10", 11: "sd11"}
    recs += [
        rec(
            f"sd{s}",
            "student",
            acc,
            "smoke",
            "s1",
            method="sd",
            seed=s,
            teacher_run_id=ids.train[t],
            teacher_seeds=str(t),
            config_hash=f"sd{s}",
            params=_params("smoke", "student"),
        )
        for s, t, acc in ((10, 0, (80.0, 81.0)), (11, 1, (82.5, 83.0)))
    ]
    ids.sd_t2 = "sdT2"
    recs.append(
        rec(
            "sdT2",
            "student",
            (78.0, 79.0),
            "smoke · temperature=2.0",
            "s2",
            method="sd",
            seed=10,
            teacher_run_id=ids.train[0],
            teacher_seeds="0",
            config_hash="sdT2",
            params=_params("smoke", "student", temperature=2.0),
        )
    )
    ids.sd_ens = "sd-ens"
    recs.append(
        rec(
            "sd-ens",
            "ensemble",
            (85.5, 86.0),
            "smoke",
            "e3",
            member_role="student",
            member_seeds=("10", "11"),
            member_run_ids=tuple(ids.sd.values()),
            combine="prob",
            config_hash="se",
            params=_params("smoke", "train"),
        )
    )
    runs = records_frame(recs)
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
    # One table per place: no table for a combination no run has (logit ensemble and
    # students at temperature 2).
    assert set(tables) == {
        "smoke",
        "smoke · epochs=1",
        "smoke · ensemble: logit",
        "smoke · students: temperature=2.0",
    }
    main = tables["smoke"]
    assert _run_ids(main) == {*ids.train.values(), ids.prob, ids.kd_prob, *ids.sd.values(), ids.sd_ens}
    assert _run_ids(tables["smoke · epochs=1"]) == {ids.short}
    # The SD students learned from no ensemble: listed once, where their settings are.
    assert _run_ids(tables["smoke · ensemble: logit"]) == {*ids.train.values(), ids.logit, ids.kd_logit}
    assert _run_ids(tables["smoke · students: temperature=2.0"]) == {*ids.train.values(), ids.prob, ids.sd_t2}
    s = main.summary.set_index("row")
    assert s.loc["single models", "n"] == 3 and s.loc["single models", "test_mean"] == pytest.approx(82.0)
    assert s.loc["single models", "test_std"] == pytest.approx(2.0)
    assert s.loc["ensemble", "gain"] == pytest.approx(6.0)
    assert s.loc["KD students", "gain"] == pytest.approx(1.5)
    assert s.loc["SD students", "gain"] == pytest.approx(((81 - 80) + (83 - 82)) / 2)
    assert tables["smoke · ensemble: logit"].summary.set_index("row").loc["ensemble", "gain"] == pytest.approx(5.0)
    assert tables["smoke · students: temperature=2.0"].self_distillation["gain"].tolist() == [-1.0]


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
                assert by_id.loc[run_id, "final_test_acc"] == value


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
    def rec(run_id, role, seed, acc, **fields):
        return RunRecord(run_id, role=role, preset="p", dataset="d", group="g", seed=seed, final_test_acc=acc, **fields)

    recs = [
        rec("a", "train", 0, 50.0),
        rec("b", "train", 1, 60.0),
        rec("s1", "student", 10, 52.0, method="sd", teacher_run_id="a", teacher_seeds="0"),
        rec("s2", "student", 11, 99.0, method="sd", teacher_run_id="gone", teacher_seeds="1"),
    ]
    (t,) = compare.build_tables(records_frame(recs))
    assert t.self_distillation["run_id"].tolist() == ["s1", "s2"]
    s = t.summary.set_index("row")
    assert s.loc["SD students", "n"] == 1
    assert s.loc["SD students", "test_mean"] == 52.0 and s.loc["SD students", "gain"] == 2.0
    assert any("gone" in n and "counted in no mean or gain" in n for n in t.notes)


def test_the_accuracy_plot_has_a_panel_for_every_group(mixed):
    """A study of another student architecture has two groups: the plot the study logs
    shows both (it once drew only the first, so that KD student was missing)."""
    from kd_mlflow import plots

    tables = list(mixed.tables.values())
    fig = plots.accuracy_by_method(tables)
    try:
        panels = [ax for ax in fig.axes if ax.get_xticklabels()]
        assert len(tables) > 1 and len(panels) == len(tables)
        assert [ax.get_title().split("\n")[0] for ax in panels] == [t.label for t in tables]
    finally:
        plots.close({"f": fig})


def test_csv_of_several_groups_has_every_group_and_its_gains(mixed):
    """Several groups in one CSV (a study with a student of another architecture): each
    group's gains are rows of the gains table, under their group."""
    from kd_mlflow import gains

    tables = []
    for i, t in enumerate(mixed.tables.values()):  # a gain on each group's first train run
        run_id = t.seeds["run_id"].iloc[0]
        row = dict.fromkeys(gains.GAIN_COLUMNS, None) | {"gain": "g", "estimate": 1.0 + i, "lo": 0.5, "hi": 2.5}
        tables.append(dataclasses.replace(t, gains=pd.DataFrame([row | {"run_id": run_id, "p_value": float("nan")}])))
    assert len(tables) > 1
    frame = pd.read_csv(io.StringIO(compare.render(tables, "csv", "gains")))
    assert frame["group_id"].tolist() == [t.group_id for t in tables]
    assert frame["estimate"].tolist() == [1.0 + i for i in range(len(tables))]
    assert frame["run_id"].tolist() == [t.seeds["run_id"].iloc[0] for t in tables]


# --- issue 29: tables a user can trust (several joint sizes, duplicates, sweeps, ...) ---

SMOKE_TRAIN = {0: (80.0, 81.0), 1: (82.0, 83.0), 2: (84.0, 85.0), 3: (86.0, 87.0), 4: (88.0, 89.0)}
SMOKE = {"preset": "smoke", "dataset": "digits", "group_label": "smoke"}


def _smoke(run_id, role, acc, **fields):
    """A smoke run of group g1 (its train runs') unless ``group`` says otherwise."""
    fields.setdefault("params", _params("smoke", "student" if role == "student" else "train"))
    return _record(run_id, role, acc, **{"group": "g1", **SMOKE, **fields})


def _smoke_trains(seeds=SMOKE_TRAIN):
    return [_smoke(f"t{s}", "train", acc, seed=s, config_hash=f"t{s}") for s, acc in seeds.items()]


def _smoke_ensemble(run_id, seeds, config_hash=None, **fields):
    members = {"member_role": "train", "member_seeds": tuple(map(str, seeds))}
    members["member_run_ids"] = tuple(f"t{s}" for s in seeds)
    return _smoke(
        run_id,
        "ensemble",
        fields.pop("acc", (90.0, 91.0)),
        group="e1",
        combine="prob",
        **members,
        config_hash=config_hash or run_id,
        **fields,
    )


def _kd(run_id, seed, teacher, acc, config_hash=None, **fields):
    kd = {"method": "kd", "seed": seed, "teacher_run_id": teacher, "teacher_seeds": "0,1,2,3,4", "generation": 1}
    return _smoke(run_id, "student", acc, group="k1", config_hash=config_hash or run_id, **kd, **fields)


def _joint(run_id, seeds, test):
    members = {"member_seeds": tuple(map(str, seeds)), "params": _params("smoke", "train")}
    return _smoke(run_id, "joint", (test - 1, test), config_hash=run_id, **members)


def _estimates(t):
    """The gains of a table's counted rows (the summary's runs), as its gains table has them."""
    counted = {rid for ids in t.summary["run_ids"] for rid in ids}
    return gains_mod.estimates(**gains_mod.counted({k: getattr(t, k) for k in gains_mod.ESTIMATED}, counted))


def _labels_repeat(md: str) -> list[str]:
    """Row labels (the first cell of a table whose first column names its rows: the
    summary, gains, Figure 1, calibration) that repeat within one markdown table."""
    repeats = []
    for block in md.split("\n\n"):
        if not block.startswith(("|  |", "| gain |", "| figure |")):
            continue
        rows = [line.split(" | ")[0] for line in block.splitlines()[2:] if line.startswith("| ")]
        rows = [r for r in rows if r != "| -"]
        repeats += sorted({r for r in rows if rows.count(r) > 1})
    return repeats


def test_joint_runs_of_two_sizes_are_two_entries_each_with_its_own_gain():
    """Issue 29, finding 2: `joint --seeds 0-4` (91.09) and `joint --seeds 0-2` (83.57) in
    one group were one Figure 1 column, 87.33 ± 5.32 over runs 2; each is now its own
    column and summary row, its gain over the single models of its own seeds."""
    recs = [*_smoke_trains(), _joint("j5", range(5), 91.09), _joint("j3", range(3), 83.57)]
    (t,) = compare.build_tables(records_frame(recs))
    fig = t.figure1.set_index("title")
    five, three = "training the average (seeds 0-4)", "training the average (seeds 0-2)"
    assert fig.loc[[three, five], "n"].tolist() == [1, 1]
    assert fig.loc[[three, five], "test_acc"].tolist() == [83.57, 91.09]
    assert fig.loc[five, "gain"] == pytest.approx(91.09 - 85.0)  # the mean single of seeds 0-4
    assert fig.loc[three, "gain"] == pytest.approx(83.57 - 83.0)  # of seeds 0-2
    assert fig.loc[three, "over_run_ids"] == ["t0", "t1", "t2"]
    s = t.summary.set_index("row")
    assert s.loc[three, "gain"] == pytest.approx(83.57 - 83.0) and s.loc[three, "run_ids"] == ["j3"]
    assert s.loc[three, "gain_over"] == "single models of seeds 0-2 (mean)"
    assert s.loc[five, "gain_over"] == "single models (mean)" and s.loc[five, "n"] == 1
    est = _estimates(t)
    joint = est[est["kind"].str.startswith("joint")].set_index("run_id")
    assert joint.loc["j3", "over_run_ids"] == ["t0", "t1", "t2"] and joint.loc["j5", "n"] == 5
    md = compare.render([t], "markdown")
    assert "87.33" not in md and "| runs | 5 | 0 | 0 | 0 | 1 | 1 |" in md
    assert "| training the average (seeds 0-2) | 1 | 82.57 | - | 83.57 | - | +0.57 |" in md


def test_rows_that_more_than_one_run_fills_name_their_runs():
    """Issue 29, finding 3: with two KD students the gains had two rows `KD - mean single`;
    each row now names its student, and the summary names the seeds it averages."""
    recs = [*_smoke_trains(), _smoke_ensemble("ens", range(5))]
    recs += [_kd("kd100", 100, "ens", (86.0, 86.5)), _kd("kd101", 101, "ens", (85.0, 84.0))]
    (t,) = compare.build_tables(records_frame(recs))
    est = _estimates(t)
    assert sorted(est.loc[est["kind"] == "kd", "gain"]) == [
        "KD student 100 - mean single",
        "KD student 101 - mean single",
    ]
    assert not est["gain"].duplicated().any()
    assert t.summary.set_index("row").loc["KD students", "seeds"] == "100; 101"
    assert _labels_repeat(compare.render([t], "markdown")) == []


def test_a_duplicate_identity_from_two_processes_is_counted_once_and_said():
    """Issue 29, finding 1: two identical studies at once made two ensembles of the same
    members (one config hash) and a KD student of seed 100 under each (two hashes: each
    names its own teacher). compare listed and counted the student twice (n 2, std 0.00);
    they are one identity, counted once, with a note."""
    recs = [*_smoke_trains(), _smoke_ensemble("ens-a", range(5), "ens")]
    recs += [_smoke_ensemble("ens-b", range(5), "ens"), _kd("kd-a", 100, "ens-a", (86.0, 86.5))]
    recs.append(_kd("kd-b", 100, "ens-b", (86.0, 86.5)))
    (t,) = compare.build_tables(records_frame(recs))
    assert t.kd["run_id"].tolist() == ["kd-b"] and t.ensembles["run_id"].tolist() == ["ens-b"]
    assert t.summary.set_index("row").loc["KD students", "n"] == 1
    assert t.figure1.set_index("column").loc["kd", "n"] == 1
    notes = "\n".join(t.notes)
    assert "run kd-a superseded by kd-b" in notes and "counted once" in notes
    assert "run ens-a superseded by ens-b (same config_hash" in notes


def test_the_missing_kd_student_note_points_to_its_architecture_table():
    """Issue 29, finding 4: a KD student of another architecture sits in its own table; the
    main table's "no KD student" note names it."""
    student = _params("smoke", "student", model="resnet8")
    recs = [*_smoke_trains(), _smoke_ensemble("ens", range(5)), _kd("kd8", 100, "ens", (70.0, 71.0), params=student)]
    sd = {"method": "sd", "seed": 10, "teacher_run_id": "t0", "teacher_seeds": "0", "generation": 1}
    recs.append(_smoke("sd10", "student", (81.0, 82.0), group="s1", config_hash="sd10", **sd))  # the study's own
    main, other = compare.build_tables(records_frame(recs))
    assert other.kd["run_id"].tolist() == ["kd8"] and main.kd.empty
    (note,) = [n for n in main.notes if n.startswith("no KD student")]
    assert f'"{other.label}"' in note and "->" in other.label


def _swept(tidy_only=False):
    """A KD sweep of 3 temperatures x 2 seeds nested under its parent run, besides the study's runs."""
    recs = [*_smoke_trains(), _smoke_ensemble("ens", range(5))]
    parent = _record("sweep", None, None, name="sweep-kd-ens-temperature=1,2,4", **SMOKE)
    vals = {1.0: (80.0, 81.0), 2.0: (85.0, 82.0), 4.0: (83.0, 93.5)}  # the best test is not chosen
    kids = []
    for temp, (val, test) in vals.items():
        for seed in (100, 101):
            params = _params("smoke", "student", temperature=temp)
            kids.append(_kd(f"kd-{temp:g}-{seed}", seed, "ens", (val + seed - 100, test), params=params))
    runs = records_frame([*recs, parent, *kids])
    nested = runs["run_id"].isin([k.run_id for k in kids])
    return runs.assign(
        parent_run_id=runs["run_id"].where(~nested, "sweep").where(nested), sweep=runs["run_id"] == "sweep"
    )


def test_a_sweep_is_one_table_under_its_teachers_group():
    """Issue 29, finding 5: each setting of a sweep was a full group (its single, ensemble
    and Figure 1 tables again); the sweep is now one table of its settings under the group
    of its teacher, chosen on validation, the test accuracy of the chosen setting only."""
    (t,) = compare.build_tables(_swept())
    sweep = t.sweeps.set_index("setting")
    assert list(sweep.index) == ["temperature=1", "temperature=2", "temperature=4"]
    assert sweep["n"].tolist() == [2, 2, 2] and sweep["val_mean"].tolist() == [80.5, 85.5, 83.5]
    assert sweep["chosen"].tolist() == [False, True, False]
    assert sweep.loc["temperature=2", "test_mean"] == 82.0 and sweep["test_mean"].isna().sum() == 2
    md = compare.render([t], "markdown")
    assert sum(line.startswith("## ") for line in md.splitlines()) == 1
    assert "| temperature=2 | 2 | 85.50 ± 0.71 | 82.00 ± 0.00 | chosen |" in md
    assert "93.50" not in md  # a setting not chosen shows no test accuracy
    # One setting's full tables on request, by the label its row gives.
    label = sweep.loc["temperature=4", "label"]
    (one,) = compare.build_tables(_swept(), group=label)
    assert one.kd["run_id"].tolist() == ["kd-4-100", "kd-4-101"]


def test_runs_not_finished_are_named_with_how_long_they_have_been_silent():
    """Issue 29, finding 8: RUNNING, FAILED and KILLED runs were dropped silently; each is
    now one line in its group's table, a RUNNING one with the time since its last metric."""
    recs = [*_smoke_trains({0: (80.0, 81.0)})]
    recs.append(_smoke("t1", "train", None, seed=1, config_hash="t1", status="RUNNING", name="train-seed-1"))
    recs.append(_smoke("t2", "train", None, seed=2, config_hash="t2", status="FAILED", name="train-seed-2"))
    runs = records_frame(recs)
    started = runs.set_index("run_id")["start_time"]["t1"]
    runs = runs.assign(last_seen=runs["start_time"], end_time=0)
    runs.loc[runs["run_id"] == "t1", "last_seen"] = started + 55 * 60_000  # its last metric
    now = started / 1000 + 3600
    (t,) = compare.build_tables(runs, now=now)
    u = t.unfinished.set_index("run_id")
    assert u["status"].to_dict() == {"t1": "RUNNING", "t2": "FAILED"}
    assert u.loc["t1", "since"] == "last metric 5 min ago (started 60 min ago)"
    assert t.seeds["run_id"].tolist() == ["t0"]
    md = compare.render([t], "markdown")
    assert "### Runs not finished" in md and "| RUNNING | train | train-seed-1 |" in md
    # An experiment with nothing finished still shows what is running.
    (alone,) = compare.build_tables(records_frame(recs[1:2]), now=now)
    assert alone.unfinished["run_id"].tolist() == ["t1"] and "no metric yet" in alone.unfinished["since"].iloc[0]


def test_each_row_carries_its_own_roles_recipe():
    """Issue 29, finding 9: the JSON recipe of a train group's single-models row carried a
    student's seed and distillation settings; it is the train runs' recipe."""
    recs = [*_smoke_trains(), _smoke_ensemble("ens", range(5)), _kd("kd100", 100, "ens", (86.0, 86.5))]
    doc = json.loads(compare.render(compare.build_tables(records_frame(recs)), "json"))
    assert "temperature" not in doc["seeds"][0]["recipe"] and "temperature" in doc["kd"][0]["recipe"]
    summary = {r["row"]: r for r in doc["summary"]}
    assert summary["SD ensemble"]["gain_over"] == "ensemble"  # one ensemble: no "(mean)"


def _hand_predictions(seed: int, n: int = 40, classes: int = 3):
    """Random probabilities of ``n`` test images (their classes stored) and the test
    accuracy they give, as a run would log it."""
    from kd_mlflow.predictions import Predictions, labels_digest

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), size=n).astype(np.float16)
    labels = (np.arange(n) % classes).astype(np.int16)
    pred = probs.astype(np.float64).argmax(axis=1).astype(np.int16)
    digest = labels_digest(labels)
    p = Predictions(probs, probs, labels, labels, digest, digest, classes, pred, pred)
    return p, 100 * float((pred == labels).mean())


def test_the_sd_rows_nll_gain_is_over_each_students_own_teacher():
    """Issue 29, finding 9: the calibration table gave no NLL gain for the SD students; it
    is each student's teacher's NLL minus its own, averaged over the pairs, with its
    paired bootstrap interval (the same images drawn for both sides)."""
    from kd_mlflow import calibration, stats

    preds, recs = {}, []
    for s in (0, 1):
        preds[f"t{s}"], acc = _hand_predictions(s)
        recs.append(_smoke(f"t{s}", "train", (acc, acc), seed=s, config_hash=f"t{s}"))
    for s, teacher in ((10, "t0"), (11, "t1")):
        preds[f"sd{s}"], acc = _hand_predictions(s)
        sd = {"method": "sd", "seed": s, "teacher_run_id": teacher, "teacher_seeds": teacher[1:], "generation": 1}
        recs.append(_smoke(f"sd{s}", "student", (acc, acc), group="s1", config_hash=f"sd{s}", **sd))
    (t,) = compare.build_tables(records_frame(recs), predictions=preds)
    row = t.calibration.set_index("row").loc["SD students (mean)"]

    def nll(names):
        return np.stack([calibration.nll_per_image(preds[n].probs(), preds[n].labels()) for n in names])

    want = stats.paired_bootstrap_values(nll(["sd10", "sd11"]), nll(["t0", "t1"]))
    assert (row.nll_gain, row.nll_gain_lo, row.nll_gain_hi) == pytest.approx((want.estimate, want.lo, want.hi))
    assert want.estimate == pytest.approx((nll(["t0", "t1"]) - nll(["sd10", "sd11"])).mean())


def _logged_run(client, exp_id, name, role, seed, *, status="FINISHED", acc=None, tags=None, parent=None):
    """A run on the real server as a kd-mlflow step leaves it: its tags, its recipe's
    params, its final metrics, its status."""
    from mlflow.entities import Metric, Param

    base = {schema.ROLE: role, schema.PRESET: "smoke", schema.DATASET: "digits", schema.GROUP: "g1"}
    base |= {schema.GROUP_LABEL: "smoke", schema.SEED: str(seed), schema.CONFIG_HASH: name}
    base |= {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(exp_id, run_name=name, tags={**base, **(tags or {})})
    rid = run.info.run_id
    params = [Param(k, v) for k, v in _params("smoke", role).items()]
    metrics = [
        Metric(k, v, 0, 0) for k, v in zip((schema.FINAL_VAL_ACC, schema.FINAL_TEST_ACC), acc or (), strict=False)
    ]
    client.log_batch(rid, metrics=metrics, params=params)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.mark.e2e
def test_compare_on_a_server_names_runs_not_finished_and_gathers_a_sweep(tracked):
    """Through runs.results_frame's one search on a real server: a RUNNING run (its last
    metric's time read back), a KILLED one, and a sweep's nested students as one table."""
    from conftest import invoke

    c = tracked.client
    exp = c.create_experiment(tracked.experiment)
    t0 = _logged_run(c, exp, "train-seed-0", "train", 0, acc=(80.0, 81.0))
    running = _logged_run(c, exp, "train-seed-1", "train", 1, status="RUNNING")
    c.log_metric(running, "val_acc", 50.0, step=1)
    killed = _logged_run(c, exp, "train-seed-2", "train", 2, status="KILLED")
    sweep = c.create_run(exp, run_name="sweep-sd", tags={schema.SWEEP: "true", schema.PRESET: "smoke"}).info.run_id
    sd = {schema.METHOD: "sd", schema.TEACHER_RUN_ID: t0, schema.GROUP: "s1"}
    for seed, acc in ((10, (82.0, 83.0)), (11, (84.0, 85.0))):
        _logged_run(c, exp, f"sd-{seed}", "student", seed, acc=acc, tags=sd, parent=sweep)
    c.set_terminated(sweep, "FINISHED")
    out = invoke("compare", "--no-intervals")
    assert out.exit_code == 0, out.output
    md = out.stdout
    assert "| RUNNING | train | train-seed-1 | last metric " in md and f"| {running} |" in md
    assert "| KILLED | train | train-seed-2 | ended " in md and f"| {killed} |" in md
    assert "### Sweep sweep-sd (chosen on validation; test of the chosen only)" in md
    assert sum(line.startswith("## ") for line in md.splitlines()) == 1  # the sweep's settings are rows


def test_its_study_fixture_is_a_file_not_a_server():
    """This file's `study` is a sqlite file in a temp dir (test_study's is a real study on a
    server), so its tests are unit tests, wherever the file is collected; its one test on a
    real server is e2e for that. (In this file, so that it runs whenever they are collected.)"""
    golden = {n: r for n, r in E2E_REASONS.items() if "test_compare_golden.py::" in n}
    on_a_server = {n for n in golden if "::test_compare_on_a_server" in n}
    assert on_a_server and all(golden[n] for n in on_a_server)
    assert all(r is None for n, r in golden.items() if n not in on_a_server), golden
