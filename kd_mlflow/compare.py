"""From kd-mlflow's runs to the study's tables: single models, ensembles, KD and SD
students and a summary, per group of comparable runs.

The input is :func:`kd_mlflow.runs.records_frame`: one row per RunRecord (the one
reading of a run's params and tags), plain column names. Pure pandas, no MLflow and no
torch, so it is tested on hand-made records as well as on real runs.

Where a run is listed follows its lineage, computed once per (preset, dataset) by
:func:`places`: a train run in every table of its train group; an ensemble where its
members are, with its own combine mode; a student where its teacher is, in the table of
its own settings. Train runs and their ensembles are every table's baselines, so each
table of their line lists them; every other run is listed in one table at most.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from kd_mlflow import config, measures
from kd_mlflow import gains as gains_mod
from kd_mlflow import schema as S

FORMATS = ("markdown", "csv", "json")
TABLES = (
    "seeds",
    "ensembles",
    "kd",
    "self_distillation",
    "sd_ensembles",
    "joint",
    "summary",
    "gains",
    "mechanism",
    "figure1",
    "calibration",
    "ensemble_size",
)
_ENSEMBLE_COLUMNS = ["members", "n_members", "val_acc", "test_acc", "run_id", "member_run_ids"]
COLUMNS = {
    "seeds": ["seed", "val_acc", "test_acc", "run_id"],
    "ensembles": _ENSEMBLE_COLUMNS,
    "kd": [
        "seed",
        "teacher_seeds",
        "teacher_val_acc",
        "teacher_test_acc",
        "val_acc",
        "test_acc",
        "architectures",
        "teacher_run_id",
        "run_id",
    ],
    "self_distillation": [
        "teacher_seed",
        "teacher_val_acc",
        "teacher_test_acc",
        "student_seed",
        "student_val_acc",
        "student_test_acc",
        "gain",
        "architectures",
        "teacher_run_id",
        "run_id",
    ],
    "sd_ensembles": _ENSEMBLE_COLUMNS,
    "joint": _ENSEMBLE_COLUMNS,
    "summary": ["row", "n", "val_mean", "val_std", "test_mean", "test_std", "gain", "gain_over", "run_ids"],
}
_MISSING = {
    "seeds": "no finished train runs",
    "ensembles": "no ensemble of train runs yet",
    "kd": "no KD student (kd.method=kd) yet",
    "self_distillation": "no SD student (kd.method=sd) yet",
    "sd_ensembles": "no ensemble of SD students yet",
}
NO_GROUP = "-"  # runs logged before groups existed: grouped by preset and dataset alone
PLAIN = config.COMBINES[0]  # the report's way of combining an ensemble


@dataclasses.dataclass(frozen=True)
class StudyTables:
    """The tables of one group of comparable runs; columns as in ``COLUMNS``.

    A group is one training recipe on one split (the train runs' kd.group), one way of
    combining an ensemble, and one set of distillation settings: runs that differ in
    anything but their seed are never in the same table."""

    preset: str
    dataset: str
    label: str  # the preset and what differs from it: "smoke · epochs=1"
    group_id: str  # the train runs' kd.group, plus the variant
    recipe: dict  # the group's full recipe, as its runs logged it
    seeds: pd.DataFrame
    ensembles: pd.DataFrame
    kd: pd.DataFrame
    self_distillation: pd.DataFrame
    sd_ensembles: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str]
    gains: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=gains_mod.GAIN_COLUMNS))
    mechanism: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=gains_mod.MECHANISM_COLUMNS)
    )
    joint: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=_ENSEMBLE_COLUMNS))
    figure1: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=measures.FIGURE1_COLUMNS))
    calibration: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=measures.CALIBRATION_COLUMNS)
    )
    ensemble_size: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=measures.ENSEMBLE_SIZE_COLUMNS)
    )


# --- the records ------------------------------------------------------------


def _tidy(records: pd.DataFrame) -> pd.DataFrame:
    """Accuracies as floats, seeds as nullable ints, member seeds as text ("0,1,2"), a
    group for runs logged before groups existed."""
    out = records.rename(columns={"final_val_acc": "val_acc", "final_test_acc": "test_acc"})
    return out.assign(
        seed=pd.to_numeric(out["seed"]).astype("Int64"),
        val_acc=out["val_acc"].astype(float),
        test_acc=out["test_acc"].astype(float),
        member_seeds=out["member_seeds"].map(lambda seeds: ",".join(seeds) or None),
        teacher_seeds=out["teacher_seeds"].map(lambda seeds: seeds or None),
        group=out["group"].fillna(NO_GROUP),
        combine=out["combine"].fillna(PLAIN),
        model=[_architecture(r, p) for r, p in zip(out["recipe"], out["params"], strict=True)],
    )


def _architecture(recipe, params: dict) -> str | None:
    """A run's network ("resnet20", "resnet20@w16") where its params name a model."""
    return config.architecture(recipe.model, recipe.width) if recipe is not None and "model" in params else None


def _results(tidy: pd.DataFrame) -> pd.DataFrame:
    """FINISHED kd-mlflow runs that are results, not pointers or study parents."""
    keep = (
        (tidy["status"] == "FINISHED")
        & tidy["duplicate_of"].isna()
        & ~tidy["study"].astype(bool)
        & tidy["role"].isin(S.ROLES)
        & tidy["preset"].notna()
        & tidy["dataset"].notna()
    )
    return tidy[keep]


def _dedupe(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Keep the latest run per identity: a rerun supersedes, it adds no seed. Returns the
    kept rows and, per kept run, the notes on the runs it superseded."""
    # Without a config hash, what makes a result the same is who it is.
    who = rows[["role", "group", "method", "member_role", "seed", "teacher_run_id", "member_seeds"]]
    identity = pd.Series(["|".join(map(str, r)) for r in who.itertuples(index=False)], index=rows.index)
    rows = rows.assign(key=rows["config_hash"].where(rows["config_hash"].notna(), identity))
    ordered = rows.sort_values(["start_time", "run_id"], ascending=False)
    winner = ordered.drop_duplicates("key").set_index("key")["run_id"]
    notes: dict[str, list[str]] = {}
    for r in ordered[ordered.duplicated("key")].itertuples():
        same = "config_hash" if pd.notna(r.config_hash) else "role, seed and teacher/members"
        notes.setdefault(winner[r.key], []).append(
            f"run {r.run_id} superseded by {winner[r.key]} (same {same}, later start)"
        )
    return rows[rows["run_id"].isin(winner)].drop(columns="key"), notes


# --- lineage: where each run is listed, computed once --------------------------


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a run is listed: the train group its line starts from, the combine mode of
    the ensembles in its line, and what its students' settings add ("temperature=2.0",
    "lr=0.005"): one table per place."""

    group: str
    combine: str = PLAIN
    settings: tuple = ()


APART = Place("mixed")  # an ensemble of different groups, and its line: listed apart, in no mean
UNATTACHED = Place("unattached")  # a teacher or member that is not a finished run here


def places(part: pd.DataFrame) -> tuple[dict, dict]:
    """Run id -> its Place, for the finished results of one (preset, dataset), and run id
    -> why, for a run listed apart or unattached (its line inherits that).

    A train run's place is its train group, and so is a joint run's. An ensemble is where its members are, with
    its own combine mode (apart if they are in different places, or it is tagged
    kd.mixed); a student is where its teacher is, with its own settings
    (:func:`_settings`). Superseded runs count: a student learned from the run it names."""
    by_id = {r.run_id: r for r in part.itertuples(index=False)}
    found: dict = {}
    why: dict = {}

    def place(run_id, line=()) -> Place:
        if run_id not in found:
            if run_id not in by_id or run_id in line:  # not here, or a loop
                return UNATTACHED
            found[run_id], reason = _place_of(by_id[run_id], by_id, lambda r: place(r, (*line, run_id)))
            if reason:
                why[run_id] = reason
        return found[run_id]

    for run_id in by_id:
        place(run_id)
    return found, why


def _place_of(r, by_id: dict, place) -> tuple[Place, str | None]:
    if r.role == "train":
        return Place(r.group), None
    if r.role == "ensemble":
        return _ensemble_place(r, by_id, place)
    if r.role == S.JOINT:
        return _joint_place(r, by_id)
    return _student_place(r, by_id, place)


def _joint_place(r, by_id: dict) -> tuple[Place, str | None]:
    """A joint run (K networks of the train recipe trained as one) is where the train runs
    of its recipe and split are: it is the fifth column of their Figure 1."""
    if r.recipe is not None:
        mine = r.recipe.digest("train")
        for t in by_id.values():
            if t.role == "train" and t.recipe is not None and t.split_digest == r.split_digest:
                if t.recipe.digest("train") == mine:
                    return Place(t.group), None
    return UNATTACHED, f"joint run {r.run_id} has no train runs of its recipe and split here"


def _ensemble_place(r, by_id: dict, place) -> tuple[Place, str | None]:
    if r.mixed:
        return APART, "tagged kd.mixed: its members are of different groups (ensemble --allow-mixed)"
    if r.member_role not in ("train", "student"):
        return APART, f"its members are {r.member_role}: train and student runs together"
    at = {m: place(m) for m in r.member_run_ids}
    if not at:
        return UNATTACHED, f"ensemble {r.run_id} names no members"
    for m, p in at.items():
        if p in (UNATTACHED, APART):
            return p, f"member {m} of ensemble {r.run_id} {_not_placed(p, m, by_id)}"
    if len(set(at.values())) > 1:
        labels = sorted({str(by_id[m].group_label) for m in at})
        return APART, f"its members are of different groups or settings ({'; '.join(labels)})"
    (p,) = set(at.values())
    if p.combine not in (PLAIN, r.combine):
        return APART, f"its members learned from {p.combine} ensembles; it combines by {r.combine}"
    return Place(p.group, r.combine, p.settings), None


def _student_place(r, by_id: dict, place) -> tuple[Place, str | None]:
    t = place(r.teacher_run_id)
    if t in (UNATTACHED, APART):
        return t, f"teacher {r.teacher_run_id} of student {r.run_id} {_not_placed(t, r.teacher_run_id, by_id)}"
    inherited = {s for s in t.settings if not s.startswith("generation=")}
    generation = {f"generation={r.generation}"} if r.generation > 1 else set()
    settings = inherited | _settings(r, by_id[r.teacher_run_id]) | generation
    return Place(t.group, t.combine, tuple(sorted(settings))), None


def _not_placed(p: Place, run_id, by_id: dict) -> str:
    if p == APART:
        return "is listed apart (mixed)"
    return "is itself unattached" if run_id in by_id else "is not a finished run of this group"


def _settings(student, teacher) -> set[str]:
    """What a student's result depends on beyond its teacher's training: its distillation
    settings where they differ from its preset's, and every training field where its
    recipe differs from its teacher's (an override such as --lr, or a preset's value
    where the teacher had another)."""
    if student.recipe is None or teacher.recipe is None:
        return {"recipe unreadable"}
    preset = config.PRESETS.get(student.preset, config.Recipe())
    reference = dataclasses.replace(teacher.recipe, **{k: getattr(preset, k) for k in config.STUDENT_FIELDS})
    return set(config.shown(student.recipe.differences(reference, "student")))


# --- the tables of one place ---------------------------------------------------


def _seeds(rows: pd.DataFrame) -> pd.DataFrame:
    t = rows[rows["role"] == "train"]
    return t[COLUMNS["seeds"]].sort_values(["seed", "run_id"]).reset_index(drop=True)


def _ensembles(rows: pd.DataFrame, of_students: bool) -> pd.DataFrame:
    return _of_members(rows[(rows["role"] == "ensemble") & ((rows["member_role"] == "student") == of_students)])


def _of_members(t: pd.DataFrame) -> pd.DataFrame:
    """Runs made of members (ensembles, joint runs), one row each."""
    members = t["member_seeds"].where(t["member_seeds"].notna(), t["member_run_ids"].map(",".join))
    out = t.assign(
        members=t["member_seeds"],
        n_members=_int(members.map(lambda m: None if not m else len(m.split(",")))),
        member_run_ids=t["member_run_ids"].map(list),
    )
    out = out[_ENSEMBLE_COLUMNS].sort_values(["n_members", "members", "run_id"])
    return out.reset_index(drop=True)


def _int(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype("Int64")


def _teachers(students: pd.DataFrame, lookup: pd.DataFrame) -> pd.DataFrame:
    """Each student's teacher row, aligned with ``students``; NaN where it is not a
    finished run of this preset and dataset (``lookup``: all of them, superseded too)."""
    teachers = lookup.reindex(students["teacher_run_id"].to_numpy())
    teachers.index = students.index
    return teachers


def _arrows(students: pd.DataFrame, teacher: pd.DataFrame) -> pd.Series:
    """The "teacher -> student" architectures: the teacher's from the student's tag
    (kd.teacher_model), else (runs logged before it) from the teacher's own run."""
    t_arch = students["teacher_model"].where(students["teacher_model"].notna(), teacher["model"])
    pairs = zip(t_arch, students["model"], strict=True)
    return pd.Series(
        [None if pd.isna(a) or pd.isna(b) else f"{a} -> {b}" for a, b in pairs], index=students.index, dtype=object
    )


def _kd(rows: pd.DataFrame, lookup: pd.DataFrame) -> pd.DataFrame:
    t = rows[(rows["role"] == "student") & (rows["method"] == "kd")]
    teacher = _teachers(t, lookup)
    out = t.assign(
        teacher_seeds=t["teacher_seeds"].where(t["teacher_seeds"].notna(), teacher["member_seeds"]),
        teacher_val_acc=teacher["val_acc"],
        teacher_test_acc=teacher["test_acc"],
        architectures=_arrows(t, teacher),
    )
    return out[COLUMNS["kd"]].sort_values(["seed", "run_id"]).reset_index(drop=True)


def _self_distillation(rows: pd.DataFrame, lookup: pd.DataFrame) -> pd.DataFrame:
    t = rows[(rows["role"] == "student") & (rows["method"] != "kd")]
    teacher = _teachers(t, lookup)
    out = pd.DataFrame(
        {
            # The student's own kd.teacher_seeds tag still names a lost teacher's seed.
            "teacher_seed": teacher["seed"].fillna(_int(t["teacher_seeds"])),
            "teacher_val_acc": teacher["val_acc"],
            "teacher_test_acc": teacher["test_acc"],
            "student_seed": t["seed"],
            "student_val_acc": t["val_acc"],
            "student_test_acc": t["test_acc"],
            "gain": t["test_acc"] - teacher["test_acc"],
            "architectures": _arrows(t, teacher),
            "teacher_run_id": t["teacher_run_id"],
            "run_id": t["run_id"],
        },
        index=t.index,
    )
    out = out.sort_values(["teacher_seed", "student_seed", "run_id"])
    return out.reset_index(drop=True)


def _stat(row: str, val: pd.Series, test: pd.Series, run_ids: pd.Series, gain=float("nan"), gain_over=None) -> dict:
    """One summary row: mean and sample std (NaN below two runs)."""
    return {
        "row": row,
        "n": len(run_ids),
        "val_mean": val.mean(),
        "val_std": val.std(ddof=1),
        "test_mean": test.mean(),
        "test_std": test.std(ddof=1),
        "gain": gain,
        "gain_over": gain_over,
        "run_ids": list(run_ids),
    }


def counted(tables: dict, run_ids: set) -> dict:
    """The rows a summary counts: ``run_ids`` (the runs of the table's own line), and of
    the SD students those whose teacher's result is known."""
    out = {k: tables[k][tables[k]["run_id"].isin(run_ids)] for k in gains_mod.ESTIMATED}
    sd = out["self_distillation"]
    out["self_distillation"] = sd[sd["teacher_test_acc"].notna()]
    return out


def _summary(rows: dict) -> pd.DataFrame:
    """Means per kind of model over the counted ``rows``; each gain (test) sits on the row
    it describes and is the mean of the gains table's estimates for it
    (:func:`kd_mlflow.gains.estimates`: one source for both)."""
    est = gains_mod.estimates(**rows)

    def gain(kind: str) -> float:
        return est.loc[est["kind"] == kind, "estimate"].mean()

    ens, kd, sd, sde = rows["ensembles"], rows["kd"], rows["self_distillation"], rows["sd_ensembles"]
    seeds = rows["seeds"]
    return pd.DataFrame(
        [
            _stat("single models", seeds["val_acc"], seeds["test_acc"], seeds["run_id"]),
            _stat("ensemble", ens["val_acc"], ens["test_acc"], ens["run_id"], gain("ensemble"), "single models (mean)"),
            _stat("KD students", kd["val_acc"], kd["test_acc"], kd["run_id"], gain("kd"), "single models (mean)"),
            _stat(
                "SD students",
                sd["student_val_acc"],
                sd["student_test_acc"],
                sd["run_id"],
                gain("sd_mean"),
                "own teacher (mean of differences)",
            ),
            _stat(
                "SD ensemble",
                sde["val_acc"],
                sde["test_acc"],
                sde["run_id"],
                gain("sd_ensemble"),
                "ensemble (mean)",
            ),
        ],
        columns=COLUMNS["summary"],
    )


def _study(head: dict, rows: pd.DataFrame, lookup: pd.DataFrame, in_line: set | None, notes: list) -> StudyTables:
    """One table set. ``in_line``: the listed runs that belong to this table's line (the
    others are listed with a note, counted in no mean or gain); None for a table of runs
    listed apart, which has no summary."""
    tables = {
        "seeds": _seeds(rows),
        "ensembles": _ensembles(rows, of_students=False),
        "kd": _kd(rows, lookup),
        "self_distillation": _self_distillation(rows, lookup),
        "sd_ensembles": _ensembles(rows, of_students=True),
        "joint": _of_members(rows[rows["role"] == S.JOINT]),
    }
    kd = rows[rows["run_id"].isin(tables["kd"]["run_id"])]
    notes = notes + [f"KD: {c}" for c in kd.get("sweep_kd_choice", pd.Series(dtype=object)).dropna()]
    if in_line is None:
        return StudyTables(**head, **tables, summary=pd.DataFrame(columns=COLUMNS["summary"]), notes=notes)
    summary = _summary(counted(tables, in_line))
    notes = notes + [m for k, m in _MISSING.items() if tables[k].empty]
    counted_joint = tables["joint"][tables["joint"]["run_id"].isin(in_line)]
    figure1 = measures.figure1(head, summary, {**tables, "joint": counted_joint})
    return StudyTables(**head, **tables, summary=summary, notes=notes, figure1=figure1)


# --- the tables of one (preset, dataset) ------------------------------------------


def _label(base: str, p: Place, arrow: str | None = None) -> str:
    """The train group's label, and what the place changes: the ensemble's combine mode,
    the students' settings, and (``arrow``) "resnet56 -> resnet20" where the students'
    architecture is not their teachers' (it then stands for model= and width=)."""
    parts = [base]
    if p.combine != PLAIN:
        parts.append(f"ensemble: {p.combine}")
    shape = ("model=", "width=") if arrow else ()
    settings = [s for s in p.settings if not s.startswith(shape)]
    if settings:
        parts.append("students: " + ", ".join(settings))
    if arrow:
        parts.append(arrow)
    return " · ".join(parts)


def _table_places(rows: pd.DataFrame, at: dict, shared: pd.Series, groups: list) -> list[Place]:
    """Every table's place, each train group's in order (the preset's own settings first):
    the places of its runs, and one per combine mode of its ensembles (or one, for the
    train runs alone) where no run of its own is listed with them."""
    own = {at[r] for r in rows.loc[~shared, "run_id"]}
    out = []
    for g in groups:
        mine = {p for p in own if p.group == g}
        ens = rows[shared & (rows["role"] == "ensemble") & (rows["group_of_line"] == g)]
        mine |= {Place(g, c) for c in set(ens["combine"]) if not any(p.combine == c for p in mine)}
        out += sorted(mine or {Place(g)}, key=lambda p: (p.combine != PLAIN, p.combine, p.settings))
    return out


def _partition(part: pd.DataFrame) -> list[StudyTables]:
    """The tables of one (preset, dataset): one per place, then the runs listed apart and,
    where several train groups leave no one table for them, the unattached ones."""
    preset, dataset = part["preset"].iloc[0], part["dataset"].iloc[0]
    part = part.drop_duplicates("run_id")
    at, why = places(part)
    rows, superseded = _dedupe(part)
    rows = rows.assign(group_of_line=rows["run_id"].map(lambda r: at[r].group))
    # Train runs and their ensembles are the baselines of every table of their line.
    shared = (rows["role"] == "train") | (
        (rows["role"] == "ensemble")
        & (rows["member_role"] == "train")
        & ~rows["group_of_line"].isin([APART.group, UNATTACHED.group])
    )
    trains = rows[rows["role"] == "train"]
    labels = trains.groupby("group")["group_label"].first()
    lines = set(rows["group_of_line"]) - {APART.group, UNATTACHED.group}
    groups = sorted(lines, key=lambda g: (labels.get(g) not in (None, preset), str(labels.get(g)), g)) or [NO_GROUP]
    table_places = _table_places(rows, at, shared, groups)
    # With one train group, a run whose teacher or member is not here is listed in its
    # first table, with a note, as before groups existed.
    home = {UNATTACHED: table_places[0]} if len(groups) == 1 else {}
    listed_at = rows["run_id"].map(lambda r: home.get(at[r], at[r]))
    lookup = part.set_index("run_id")
    out = []
    for p in [*table_places, APART, UNATTACHED]:
        mine = rows[listed_at.map(p.__eq__) & ~shared]
        if p in (APART, UNATTACHED):
            if len(mine):
                out.append(_apart(preset, dataset, p, mine, lookup, why, superseded))
            continue
        line = rows[shared & (rows["group_of_line"] == p.group)]
        line = line[(line["role"] == "train") | (line["combine"] == p.combine)]
        listed = pd.concat([line, mine])
        lost = {r for r in mine["run_id"] if at[r] == UNATTACHED}
        base = labels.get(p.group) if isinstance(labels.get(p.group), str) else preset
        head = {
            "preset": preset,
            "dataset": dataset,
            "label": _label(base, p, _arrow(line, mine)),
            "group_id": p.group if p == Place(p.group) else f"{p.group}/{p.combine}/{','.join(p.settings)}",
            "recipe": _recipe(line, mine),
        }
        notes = _notes(listed, superseded) + [f"{why[r]}; listed but counted in no mean or gain" for r in sorted(lost)]
        out.append(_study(head, listed, lookup, set(listed["run_id"]) - lost, notes))
    return out


def _arrow(line: pd.DataFrame, mine: pd.DataFrame) -> str | None:
    """The arrow "resnet56 -> resnet20" where a table's students are not of its train runs'
    architecture; None where they are (or either is unknown)."""
    own = set(line.loc[line["role"] == "train", "model"].dropna())
    archs = set(mine.loc[mine["role"] == "student", "model"].dropna())
    return f"{'+'.join(sorted(own))} -> {'+'.join(sorted(archs))}" if own and archs and archs != own else None


def _recipe(line: pd.DataFrame, mine: pd.DataFrame) -> dict:
    """The table's full recipe as its runs logged it: the train runs', with a student's
    settings where the table has its own."""
    recipe = dict(line.loc[line["role"] == "train", "params"].iloc[-1]) if (line["role"] == "train").any() else {}
    students = mine[mine["role"] == "student"]
    return {**recipe, **(students["params"].iloc[-1] if len(students) else {})}


def _notes(listed: pd.DataFrame, superseded: dict) -> list[str]:
    return [n for r in listed["run_id"] for n in superseded.get(r, [])]


def _apart(preset, dataset, p: Place, rows, lookup, why: dict, superseded: dict) -> StudyTables:
    """The runs listed apart (mixed) or unattached: each with the reason, in no mean."""
    head = {"preset": preset, "dataset": dataset, "label": f"{preset} · {p.group}", "group_id": p.group, "recipe": {}}
    reasons = [
        f"{r.role} {r.run_id}: {why[r.run_id]}; listed here, in no group's mean or gain" for r in rows.itertuples()
    ]
    return _study(head, rows, lookup, None, _notes(rows, superseded) + reasons)


def build_tables(
    runs: pd.DataFrame,
    preset: str | None = None,
    dataset: str | None = None,
    group: str | None = None,
    predictions: dict | None = None,
) -> list[StudyTables]:
    """One StudyTables per group of comparable runs, optionally filtered; ``runs`` as
    :func:`kd_mlflow.runs.records_frame` makes it.

    Only FINISHED runs with a kd.role and without kd.duplicate_of or kd.study are
    results; [] when none is left. ``group`` keeps the groups whose label or id starts
    with it. With ``predictions`` (run id -> predictions.Predictions), every gain gets
    its intervals and the mechanism figures are filled in (:mod:`kd_mlflow.gains`).
    """
    if runs.empty:
        return []
    rows = _results(_tidy(runs))
    if preset is not None:
        rows = rows[rows["preset"] == preset]
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
    tables = [t for _, part in rows.groupby(["preset", "dataset"], sort=True) for t in _partition(part)]
    if group is not None:
        tables = [t for t in tables if t.label.startswith(group) or t.group_id.startswith(group)]
    if predictions is not None:
        tables = [with_intervals(t, predictions) for t in tables]
    return tables


def with_intervals(t: StudyTables, predictions: dict) -> StudyTables:
    g, m, notes = gains_mod.compute(t, predictions)
    figure1, calibration, size = measures.compute(t, predictions)
    return dataclasses.replace(
        t, gains=g, mechanism=m, figure1=figure1, calibration=calibration, ensemble_size=size, notes=t.notes + notes
    )


def run_ids(tables: list[StudyTables]) -> list[str]:
    """Every run a set of tables names (for fetching their predictions)."""
    ids = []
    for t in tables:
        ids += list(t.seeds["run_id"]) + list(t.ensembles["run_id"]) + list(t.kd["run_id"])
        ids += list(t.self_distillation["run_id"]) + list(t.self_distillation["teacher_run_id"].dropna())
        ids += list(t.sd_ensembles["run_id"]) + list(t.joint["run_id"])
        ids += [m for members in t.ensembles["member_run_ids"] for m in members]
    return list(dict.fromkeys(ids))


# --- rendering ------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    """A cell: "-" for a missing value."""
    if value is None or (not isinstance(value, (str, list)) and pd.isna(value)):
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table; a row of dashes stands for a piece not run yet."""
    lines = [header, ["---"] * len(header), *(rows or [["-"] * len(header)])]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


_ACC = ["validation accuracy", "test accuracy"]


def _ens(df: pd.DataFrame) -> list[list[str]]:
    return [[_fmt(r.members), _fmt(r.val_acc), _fmt(r.test_acc)] for r in df.itertuples()]


def _md_sections(t: StudyTables) -> list[tuple[str, str]]:
    """(title, table) pairs in the report's order."""
    seeds = [[_fmt(r.seed, "d"), _fmt(r.val_acc), _fmt(r.test_acc)] for r in t.seeds.itertuples()]
    kd = [
        [
            _fmt(r.teacher_seeds),
            _fmt(r.teacher_val_acc),
            _fmt(r.teacher_test_acc),
            _fmt(r.seed, "d"),
            _fmt(r.val_acc),
            _fmt(r.test_acc),
        ]
        for r in t.kd.itertuples()
    ]
    sd = [
        [
            _fmt(r.teacher_seed, "d"),
            _fmt(r.teacher_val_acc),
            _fmt(r.teacher_test_acc),
            _fmt(r.student_seed, "d"),
            _fmt(r.student_val_acc),
            _fmt(r.student_test_acc),
        ]
        for r in t.self_distillation.itertuples()
    ]
    summary = [
        [
            r.row,
            str(r.n),
            _fmt(r.val_mean),
            _fmt(r.val_std),
            _fmt(r.test_mean),
            _fmt(r.test_std),
            _fmt(r.gain, "+.2f"),
            _fmt(r.gain_over),
        ]
        for r in t.summary.itertuples()
    ]
    pair = ["seed", *_ACC, "seed", *_ACC]
    return [
        ("Single models", _md_table(["seed", *_ACC], seeds)),
        ("Ensemble of single models", _md_table(["members", *_ACC], _ens(t.ensembles))),
        ("Knowledge distillation (teacher left, student right)" + _arch_note(t.kd), _md_table(pair, kd)),
        ("Self-distillation (teacher left, student right)" + _arch_note(t.self_distillation), _md_table(pair, sd)),
        ("Ensemble of SD students", _md_table(["members", *_ACC], _ens(t.sd_ensembles))),
        (
            "Summary (gain: test accuracy)",
            _md_table(
                ["", "n", "validation mean", "validation std", "test mean", "test std", "gain", "gain over"], summary
            ),
        ),
    ]


def _arch_note(students: pd.DataFrame) -> str:
    """The teacher -> student architectures for a table's title: ": resnet56 -> resnet20"."""
    arrows = list(dict.fromkeys(students["architectures"].dropna()))
    return f": {', '.join(arrows)}" if arrows else ""


def _md_uncertainty(t: StudyTables) -> list[tuple[str, str]]:
    if t.gains.empty and t.mechanism.empty:
        return []
    from kd_mlflow.stats import fmt_interval

    rows = []
    for r in t.gains.itertuples():
        p = "-" if pd.isna(r.p_value) else f"{r.p_value:.3g} ({int(r.b)}/{int(r.c)})"
        seed = "-" if pd.isna(r.seed_lo) else fmt_interval(r.estimate, r.seed_lo, r.seed_hi)
        rows.append([r.gain, fmt_interval(r.estimate, r.lo, r.hi), seed, p])
    mech = []
    for r in t.mechanism.itertuples():
        spec = ".3f" if r.detail == "nats" else ".2f"
        value = _fmt(r.value, spec) + ("" if pd.isna(r.lo) else f" [{r.lo:{spec}}, {r.hi:{spec}}]")
        mech.append([r.figure, value, r.detail])
    out = []
    if rows:
        out.append(
            (
                "Gains with 95% intervals (test accuracy, points)",
                _md_table(
                    [
                        "gain",
                        "estimate [95% paired bootstrap over test images]",
                        "[95% t over pairs]",
                        "McNemar p (teacher-only / student-only right)",
                    ],
                    rows,
                ),
            )
        )
    if mech:
        out.append(("Mechanism (test set)", _md_table(["figure", "value", "unit"], mech)))
    return out


def _acc_cell(r) -> str:
    """ "85.95 ± 0.37 [85.49, 86.41]": a column's mean, its std and t-interval over seeds."""
    if pd.isna(r.test_acc):
        return "-"
    std = "" if pd.isna(r.test_std) else f" ± {r.test_std:.2f}"
    seeds = "" if pd.isna(r.seed_lo) else f" [{r.seed_lo:.2f}, {r.seed_hi:.2f}]"
    return f"{r.test_acc:.2f}{std}{seeds}"


def _gain_cell(estimate, lo, hi, spec: str = "+.2f") -> str:
    if pd.isna(estimate):
        return "-"
    return format(estimate, spec) + ("" if pd.isna(lo) else f" [{lo:{spec}}, {hi:{spec}}]")


def _md_figure1(t: StudyTables) -> list[tuple[str, str]]:
    """Figure 1 (five columns), calibration and ensemble size, where the group has them."""
    out = []
    if not t.figure1.empty:
        cols = list(t.figure1.itertuples())
        rows = [
            ["runs", *(str(r.n) for r in cols)],
            ["test accuracy (mean ± std [95% t over seeds])", *(_acc_cell(r) for r in cols)],
            ["gain over mean single [95% paired bootstrap]", *(_gain_cell(r.gain, r.gain_lo, r.gain_hi) for r in cols)],
        ]
        for source, what in (
            ("report", "the report (ResNet-18, CIFAR-10)"),
            ("paper", "the paper (WRN-28-10, CIFAR-10)"),
        ):
            if t.figure1[source].notna().any():
                rows.append([what, *(_fmt(getattr(r, source)) for r in cols)])
        titles = [title for _, title, _ in measures.FIGURE1]
        out.append(("Figure 1 (test accuracy, %; Allen-Zhu and Li, ICLR 2023)", _md_table(["", *titles], rows)))
    if not t.calibration.empty:
        rows = [
            [
                r.row,
                str(r.n),
                _fmt(r.nll, ".4f"),
                _fmt(r.ece, ".4f"),
                _fmt(r.brier, ".4f"),
                _gain_cell(r.nll_gain, r.nll_gain_lo, r.nll_gain_hi, "+.4f"),
            ]
            for r in t.calibration.itertuples()
        ]
        header = [
            "",
            "n",
            "NLL (nats)",
            "ECE (15 bins)",
            "Brier",
            "NLL gain: mean single - this [95% paired bootstrap]",
        ]
        out.append(("Calibration (test set; means over runs)", _md_table(header, rows)))
    if not t.ensemble_size.empty:
        rows = [
            [
                _fmt(r.members),
                str(r.k),
                str(r.n_subsets),
                f"{r.acc_mean:.2f} [{r.acc_min:.2f}, {r.acc_max:.2f}]",
                f"{r.nll_mean:.4f} [{r.nll_min:.4f}, {r.nll_max:.4f}]",
            ]
            for r in t.ensemble_size.itertuples()
        ]
        header = ["members", "k", "subsets", "test accuracy: mean [min, max]", "NLL: mean [min, max]"]
        out.append(("Ensemble size (average of k members' probabilities)", _md_table(header, rows)))
    return out


def _markdown(tables: list[StudyTables]) -> str:
    if not tables:
        return "no finished runs\n"
    parts = []
    for t in tables:
        parts.append(f"## {t.label} ({t.dataset})\n\ngroup `{t.group_id}`")
        parts += [f"### {title}\n\n{table}" for title, table in _md_sections(t)]
        parts += [f"### {title}\n\n{table}" for title, table in _md_uncertainty(t) + _md_figure1(t)]
        if t.notes:
            parts.append("### Notes\n\n" + "\n".join(f"- {n}" for n in t.notes))
    return "\n\n".join(parts) + "\n"


def _native(value):
    """A JSON-ready value: NaN and NA become None, numpy scalars Python ones."""
    if isinstance(value, list):
        return value
    if value is None or pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def table_rows(tables: list[StudyTables]) -> dict[str, list[dict]]:
    """Every table as row dicts tagged with preset and dataset; keys TABLES + notes."""
    out: dict[str, list[dict]] = {name: [] for name in (*TABLES, "notes")}
    for t in tables:
        group = {"group": t.label, "group_id": t.group_id, "preset": t.preset, "dataset": t.dataset, "recipe": t.recipe}
        for name in TABLES:
            records = getattr(t, name).to_dict("records")
            out[name] += [{**group, **{k: _native(v) for k, v in r.items()}} for r in records]
        out["notes"] += [{**group, "note": n} for n in t.notes]
    return out


CSV_COLUMNS = [
    "section",
    "group",
    "role",
    "seed",
    "teacher_seed",
    "members",
    "val_acc",
    "test_acc",
    "gain",
    "gain_lo",
    "gain_hi",
    "mcnemar_p",
    "run_id",
    "group_id",
    "preset",
    "dataset",
    "k",
    "nll",
    "ece",
    "brier",
    "nll_gain",
    "nll_gain_lo",
    "nll_gain_hi",
]


def _csv(tables: list[StudyTables]) -> str:
    """Tidy: one row per run and table it appears in, so that ``pandas.read_csv`` gives
    a frame ready to pivot (summaries and notes are in the markdown and JSON)."""
    rows: list[dict] = []
    for t in tables:
        first = len(rows)  # this table's rows start here
        g = {"group": t.label, "group_id": t.group_id, "preset": t.preset, "dataset": t.dataset}
        for r in t.seeds.itertuples():
            rows.append(
                {
                    **g,
                    "section": "seeds",
                    "role": "train",
                    "seed": r.seed,
                    "val_acc": r.val_acc,
                    "test_acc": r.test_acc,
                    "run_id": r.run_id,
                }
            )
        for section, frame, role in (
            ("ensembles", t.ensembles, "ensemble"),
            ("sd_ensembles", t.sd_ensembles, "ensemble"),
            ("joint", t.joint, S.JOINT),
        ):
            for r in frame.itertuples():
                rows.append(
                    {
                        **g,
                        "section": section,
                        "role": role,
                        "members": r.members,
                        "val_acc": r.val_acc,
                        "test_acc": r.test_acc,
                        "run_id": r.run_id,
                    }
                )
        for r in t.kd.itertuples():
            rows.append(
                {
                    **g,
                    "section": "kd",
                    "role": "student",
                    "seed": r.seed,
                    "members": r.teacher_seeds,
                    "val_acc": r.val_acc,
                    "test_acc": r.test_acc,
                    "run_id": r.run_id,
                }
            )
        for r in t.self_distillation.itertuples():
            rows.append(
                {
                    **g,
                    "section": "self_distillation",
                    "role": "student",
                    "seed": r.student_seed,
                    "teacher_seed": r.teacher_seed,
                    "val_acc": r.student_val_acc,
                    "test_acc": r.student_test_acc,
                    "run_id": r.run_id,
                }
            )
        for e in t.gains[t.gains["run_id"].notna()].itertuples():
            for row in rows[first:]:  # (earlier tables' measure rows have no run id)
                if row["run_id"] == e.run_id:
                    row.update(
                        gain=e.estimate, gain_lo=e.lo, gain_hi=e.hi, mcnemar_p=None if pd.isna(e.p_value) else e.p_value
                    )
        rows += _csv_measures(t, g)
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for col in ("seed", "teacher_seed", "k"):
        frame[col] = pd.array(frame[col].map(lambda v: None if v is None or pd.isna(v) else int(v)), dtype="Int64")
    return frame.to_csv(index=False)


def _csv_measures(t: StudyTables, g: dict) -> list[dict]:
    """Figure 1's columns (role: the column), the calibration rows (role: the row) and the
    ensemble-size points (members, k; test_acc and nll their means over subsets)."""
    rows = [
        {**g, "section": "figure1", "role": r.column, "test_acc": r.test_acc}
        | {"gain": r.gain, "gain_lo": r.gain_lo, "gain_hi": r.gain_hi}
        for r in t.figure1.itertuples()
    ]
    rows += [
        {**g, "section": "calibration", "role": r.row, "nll": r.nll, "ece": r.ece, "brier": r.brier}
        | {"nll_gain": r.nll_gain, "nll_gain_lo": r.nll_gain_lo, "nll_gain_hi": r.nll_gain_hi}
        for r in t.calibration.itertuples()
    ]
    rows += [
        {**g, "section": "ensemble_size", "role": "ensemble", "members": r.members, "k": r.k}
        | {"test_acc": r.acc_mean, "nll": r.nll_mean, "run_id": r.run_id}
        for r in t.ensemble_size.itertuples()
    ]
    return rows


def render(tables: list[StudyTables], fmt: str) -> str:
    """The tables as ``markdown``, ``csv`` or ``json`` text."""
    if fmt == "markdown":
        return _markdown(tables)
    if fmt == "csv":
        return _csv(tables)
    if fmt == "json":
        return json.dumps(table_rows(tables), indent=2, allow_nan=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
