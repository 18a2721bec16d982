"""A group's Figure 1 (Allen-Zhu and Li, ICLR 2023: single model, ensemble, KD, SD and
training the average directly), its calibration table and its ensemble-size curve
(pure: numpy and pandas, no MLflow, no torch).

Figure 1's accuracies are the summary's (the runs' logged accuracies: one number
wherever it is shown) and the joint runs'; its intervals are those the project has: a
t-interval over seeds for the columns with one run per seed, a 95% paired bootstrap over
test images for each column's gain over the mean single model. Calibration and the
ensemble-size curve come from the runs' predictions (:mod:`kd_mlflow.calibration`),
only those whose stored classes give the run's logged accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import calibration, stats
from . import gains as gains_mod
from . import tables as tables_mod

FIGURE1_COLUMNS = tables_mod.FIGURE1.names
CALIBRATION_COLUMNS = tables_mod.CALIBRATION.names
ENSEMBLE_SIZE_COLUMNS = tables_mod.ENSEMBLE_SIZE.names
# Figure 1's five columns: (name, title, the summary row it reads; None: the joint runs).
FIGURE1 = (
    ("single", "single model", "single models"),
    ("ensemble", "ensemble", "ensemble"),
    ("kd", "KD student", "KD students"),
    ("sd", "SD students", "SD students"),
    ("joint", "training the average", None),
)
# The published numbers (test accuracy, %), shown beside a group whose recipe is theirs:
# the public report's ResNet-18 on CIFAR-10 (seed-report; it gives ranges over seeds and
# did not train the average), and Allen-Zhu and Li's Figure 1, WRN-28-10 on CIFAR-10
# (wrn-paper; an ensemble of 10).
REFERENCES = {
    ("seed-report", "cifar10"): (
        "report",
        {"single": "85.46-86.39", "ensemble": "89.07", "kd": "87.00", "sd": "85.32-87.08"},
    ),
    ("wrn-paper", "cifar10"): (
        "paper",
        {"single": "96.70 ± 0.21", "ensemble": "97.20", "kd": "97.22", "sd": "97.13", "joint": "96.46"},
    ),
}
# Calibration rows: (title, Figure 1 column or summary row, whether its NLL gain is shown).
CALIBRATION = (
    ("single models (mean)", "single", False),
    ("ensemble", "ensemble", True),
    ("KD students", "kd", True),
    ("SD students (mean)", "sd", False),
    ("SD ensemble", "SD ensemble", False),
    ("training the average", "joint", True),
)
NAN = math.nan


def references(preset: str, dataset: str, label: str) -> dict:
    """{"report" | "paper": {column: text}} for a group of the references' own recipe."""
    if label != preset or (preset, dataset) not in REFERENCES:
        return {}
    source, numbers = REFERENCES[(preset, dataset)]
    return {source: numbers}


# Each column's table and its test accuracy column, in StudyTables names.
_ACCURACY = {
    "single": ("seeds", "test_acc"),
    "ensemble": ("ensembles", "test_acc"),
    "kd": ("kd", "test_acc"),
    "sd": ("self_distillation", "student_test_acc"),
    "joint": ("joint", "test_acc"),
}


JOINT_ROW = "training the average"  # the summary's joint rows start with it, one per size


def _columns(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column, title, summary row): the four fixed columns, then one joint column per
    joint entry of the summary (per size and member seeds: never one mean of several)."""
    fixed = [(name, title, row) for name, title, row in FIGURE1 if row is not None]
    joints = [r for r in summary["row"] if str(r).startswith(JOINT_ROW)]
    if not joints:
        return [*fixed, ("joint", JOINT_ROW, "")]
    if len(joints) == 1:
        return [*fixed, ("joint", JOINT_ROW, joints[0])]
    return fixed + [(f"joint{r[len(JOINT_ROW) :]}", r, r) for r in joints]


def figure1(head: dict, summary: pd.DataFrame, tables: dict) -> pd.DataFrame:
    """The columns: the runs the summary counts, their mean logged test accuracy, its gain
    over the mean single model (a joint column: over the single models of its own seeds,
    as its summary row) and, with one run per seed, a t-interval over seeds; the gains'
    bootstrap intervals come with the predictions (:func:`compute`)."""
    rows = summary.set_index("row")
    refs = references(head["preset"], head["dataset"], head["label"])
    singles = list(rows.loc["single models", "run_ids"])
    out = []
    for name, title, row in _columns(summary):
        frame, column = _ACCURACY["joint" if name.startswith("joint") else name]
        ids = list(rows.loc[row, "run_ids"]) if row in rows.index else []
        accs = tables[frame].set_index("run_id").loc[ids, column].astype(float).dropna()
        over_seeds = stats.seed_interval(accs.to_numpy()) if name in ("single", "kd", "sd") and len(accs) >= 2 else None
        joint = name.startswith("joint") and row in rows.index
        out.append(
            {
                "column": name,
                "title": title,
                "n": len(ids),
                "test_acc": accs.mean() if len(accs) else NAN,
                "test_std": accs.std(ddof=1) if len(accs) >= 2 else NAN,
                "seed_lo": over_seeds.lo if over_seeds else NAN,
                "seed_hi": over_seeds.hi if over_seeds else NAN,
                "gain": rows.loc[row, "gain"] if joint else NAN,
                "gain_lo": NAN,
                "gain_hi": NAN,
                "report": refs.get("report", {}).get(name),
                "paper": refs.get("paper", {}).get(name),
                "run_ids": ids,
                "over_run_ids": _over(tables["seeds"], singles, ids, tables["joint"]) if joint else singles,
            }
        )
    fig = pd.DataFrame(out, columns=FIGURE1_COLUMNS)
    single = fig.loc[fig["column"] == "single", "test_acc"].iloc[0]
    plain = ~fig["column"].str.startswith("joint") & (fig["column"] != "single")
    fig.loc[plain, "gain"] = fig["test_acc"] - single
    return fig


def _over(seeds: pd.DataFrame, singles: list, ids: list, joint: pd.DataFrame) -> list:
    """The single models a joint column's gain is over: those of its seeds."""
    members = joint.set_index("run_id").loc[ids, "members"].iloc[0]
    counted = seeds[seeds["run_id"].isin(singles)]
    return list(gains_mod.same_seeds(counted, members)["run_id"])


def compute(t, preds: dict, n_resamples: int = 10_000, seed: int = 0):
    """(figure1 with its gains' bootstrap intervals, calibration, ensemble_size) for one
    group's tables (``compare.StudyTables``); ``preds``: run id -> Predictions."""
    empty = (
        t.figure1,
        pd.DataFrame(columns=CALIBRATION_COLUMNS),
        pd.DataFrame(columns=ENSEMBLE_SIZE_COLUMNS),
    )
    if t.figure1.empty:
        return empty
    runs = _runs_of(t)
    teachers = _sd_teachers(t, runs["sd"])
    preds, _notes = gains_mod.usable(t, preds, tables_mod.run_ids([t]))  # gains.compute notes what is left out
    if len({p.digest("test") for p in preds.values()}) > 1:
        return empty  # gains.compute notes it
    return (
        _figure1_intervals(t.figure1, preds, teachers, n_resamples, seed),
        _calibration(t.figure1, runs, teachers, preds, n_resamples, seed),
        _ensemble_size(t, runs["ensemble"], preds),
    )


def _runs_of(t) -> dict:
    """Figure 1 column or summary row -> the run ids it counts."""
    out = dict(zip(t.figure1["column"], t.figure1["run_ids"], strict=True))
    rows = t.summary.set_index("row")
    out["SD ensemble"] = list(rows.loc["SD ensemble", "run_ids"]) if "SD ensemble" in rows.index else []
    return out


def _sd_teachers(t, students: list) -> list:
    """Each counted SD student's teacher, in the students' order (a teacher of two
    students twice): the pairs of the SD row's NLL gain."""
    teacher = t.self_distillation.set_index("run_id")["teacher_run_id"]
    return [teacher[s] for s in students]


def _all(preds: dict, ids) -> list | None:
    got = [preds.get(r) for r in ids]
    return got if got and all(p is not None for p in got) else None


def _figure1_intervals(fig: pd.DataFrame, preds: dict, teachers: list, n_resamples: int, seed: int) -> pd.DataFrame:
    """Each column's gain interval, the gains table's for the same runs: the SD students'
    paired with their own teachers (the mean over pairs)."""
    out = fig.copy()
    for i, r in fig.iterrows():
        paired = r["column"] == "sd" and len(teachers) == len(r["run_ids"])
        over, side = _all(preds, teachers if paired else r["over_run_ids"]), _all(preds, r["run_ids"])
        if r["column"] == "single" or over is None or side is None:
            continue
        c_over = np.stack([p.correct("test") for p in over])
        c_side = np.stack([p.correct("test") for p in side])
        interval, _how = gains_mod.interval(c_over, c_side, paired, n_resamples, seed)
        out.loc[i, ["gain_lo", "gain_hi"]] = [interval.lo, interval.hi]
    return out


def _calibration_rows(fig: pd.DataFrame) -> list[tuple[str, str, str | None]]:
    """(title, Figure 1 column or summary row, what its NLL gain is over: "single", "sd"
    (each student's own teacher) or None), the joint rows one per Figure 1 joint column."""
    out = []
    for title, key, with_gain in CALIBRATION:
        if key != "joint":
            out.append((title, key, "sd" if key == "sd" else "single" if with_gain else None))
            continue
        out += [(r.title, r.column, "single") for r in fig.itertuples() if str(r.column).startswith("joint")]
    return out


def _calibration(fig: pd.DataFrame, runs: dict, teachers: list, preds: dict, n_resamples: int, seed: int):
    overs = dict(zip(fig["column"], fig["over_run_ids"], strict=True))
    rows = []
    for title, key, over in _calibration_rows(fig):
        got = _all(preds, runs.get(key, []))
        if got is None:
            continue
        measured = [calibration.measure_of(p) for p in got]
        base = _all(preds, teachers if over == "sd" else overs.get(key, runs["single"])) if over else None
        gain = lo = hi = NAN
        if base is not None:
            interval = stats.paired_bootstrap_values(
                np.stack([calibration.nll_of(p) for p in got]),
                np.stack([calibration.nll_of(p) for p in base]),
                n_resamples=n_resamples,
                seed=seed,
            )
            gain, lo, hi = interval.estimate, interval.lo, interval.hi
        rows.append(
            {
                "row": title,
                "n": len(got),
                "nll": float(np.mean([m.nll for m in measured])),
                "ece": float(np.mean([m.ece for m in measured])),
                "brier": float(np.mean([m.brier for m in measured])),
                "nll_gain": gain,
                "nll_gain_lo": lo,
                "nll_gain_hi": hi,
                "run_ids": list(runs[key]),
            }
        )
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def floored(table: pd.DataFrame, preds: dict) -> list[str]:
    """A note naming the calibration table's runs whose NLL is floored: predictions of a
    format before 3, without float32 log-probabilities."""
    ids = sorted({r for run_ids in table["run_ids"] for r in run_ids if r in preds and not preds[r].has_log_probs})
    if not ids:
        return []
    return [
        f"calibration: the NLL of {len(ids)} run(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}) is "
        f"floored at -ln {calibration.NLL_EPS:g} per image: their predictions hold no float32 log-probabilities "
        "(a file before format 3), so a confidently wrong image counts at most 16.1 nats"
    ]


def _ensemble_size(t, counted: list, preds: dict) -> pd.DataFrame:
    rows = []
    for e in t.ensembles[t.ensembles["run_id"].isin(counted)].itertuples():
        members = _all(preds, e.member_run_ids)
        if members is None:
            continue
        exact = all(p.has_log_probs for p in members)  # else every subset's NLL is floored alike
        curve = calibration.ensemble_size(
            np.stack([p.probs("test") for p in members]),
            members[0].labels("test"),
            np.stack([p.top1("test") for p in members]),
            member_logp_label=np.stack([p.logp_label("test") for p in members]) if exact else None,
        )
        rows += [{"members": e.members, **point, "run_id": e.run_id} for point in curve]
    return pd.DataFrame(rows, columns=ENSEMBLE_SIZE_COLUMNS)


def reliability(t, preds: dict) -> dict:
    """Title -> reliability bins (:func:`kd_mlflow.calibration.reliability`) for the
    reliability diagrams: the single models' images pooled, the first ensemble, the first
    KD student and the first joint run, where their predictions are there."""
    out = {}
    runs = dict(zip(t.figure1["column"], t.figure1["run_ids"], strict=True))
    for name, title, _row in FIGURE1:
        if name == "sd":
            continue
        ids = runs.get(name, [])[: None if name == "single" else 1]
        got = _all(preds, ids)
        if got is None:
            continue
        probs = np.concatenate([p.probs("test") for p in got])
        labels = np.concatenate([p.labels("test") for p in got])
        out[title] = calibration.reliability(probs, labels, np.concatenate([p.top1("test") for p in got]))
    return out
