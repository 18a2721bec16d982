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
import functools
import time

import pandas as pd

from kd_mlflow import config, measures
from kd_mlflow import gains as gains_mod
from kd_mlflow import schema as S
from kd_mlflow import tables as specs
from kd_mlflow.tables import run_ids

TABLES = specs.TABLES
COLUMNS = {name: spec.names for name, spec in specs.SPECS.items()}
_MISSING = {
    "seeds": "no finished train runs",
    "ensembles": "no ensemble of train runs yet",
    "kd": "no KD student (kd.method=kd) yet",
    "self_distillation": "no SD student (kd.method=sd) yet",
    "sd_ensembles": "no ensemble of SD students yet",
}
PLAIN = config.COMBINES[0]  # the report's way of combining an ensemble


def _empty_table(name: str) -> pd.DataFrame:
    """An empty table of ``name``'s columns: what a group without it holds."""
    return pd.DataFrame(columns=COLUMNS[name])


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
    recipe: dict  # the train runs' recipe, as they logged it
    seeds: pd.DataFrame
    ensembles: pd.DataFrame
    kd: pd.DataFrame
    self_distillation: pd.DataFrame
    sd_ensembles: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str]
    gains: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("gains"))
    mechanism: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("mechanism"))
    joint: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("joint"))
    # A table of KD students of another architecture: that network trained alone (train
    # runs of the students' training recipe and split), the baseline of what KD did.
    alone: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("seeds"))
    figure1: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("figure1"))
    calibration: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("calibration"))
    ensemble_size: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("ensemble_size"))
    student_recipe: dict = dataclasses.field(default_factory=dict)  # its students' recipe, if any
    # Runs of the group that are not FINISHED: RUNNING (still going, or dead without a
    # word: how long since its last metric says which), FAILED and KILLED. One line each.
    unfinished: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("unfinished"))
    # The sweeps whose students learned from this table's teachers: one row per setting.
    sweeps: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty_table("sweeps"))
    setting_of: str | None = None  # the sweep whose one setting this table holds: shown on --group only


# --- the records ------------------------------------------------------------


_OPTIONAL = {"parent_run_id": None, "sweep": False, "last_seen": 0, "end_time": 0}


def _tidy(records: pd.DataFrame) -> pd.DataFrame:
    """Accuracies as floats, seeds as nullable ints, member seeds as text ("0,1,2"), text
    as Python objects: pandas 3's str arrays are read a value at a time here, and made
    compare's work at 1,000 runs 1.29x as long (docs/benchmarks.md)."""
    out = records.rename(columns={"final_val_acc": "val_acc", "final_test_acc": "test_acc"})
    for column, default in _OPTIONAL.items():  # runs.results_frame adds them; hand-made records may not
        if column not in out:
            out = out.assign(**{column: default})
    out = out.assign(
        seed=pd.to_numeric(out["seed"]).astype("Int64"),
        val_acc=out["val_acc"].astype(float),
        test_acc=out["test_acc"].astype(float),
        member_seeds=out["member_seeds"].map(lambda seeds: ",".join(seeds) or None),
        teacher_seeds=out["teacher_seeds"].map(lambda seeds: seeds or None),
        combine=out["combine"].fillna(PLAIN),
        model=[_architecture(r, p) for r, p in zip(out["recipe"], out["params"], strict=True)],
    )
    text = [c for c in out.columns if out[c].dtype != object and pd.api.types.is_string_dtype(out[c])]
    return out.astype(dict.fromkeys(text, object))


def _architecture(recipe, params: dict) -> str | None:
    """A run's network ("resnet20", "resnet20@w16") where its params name a model."""
    return config.architecture(recipe.model, recipe.width) if recipe is not None and "model" in params else None


def _results(tidy: pd.DataFrame) -> pd.DataFrame:
    """FINISHED kd-mlflow runs that are results, not pointers or study parents (a train
    run names its group: the recipe and split its tables are of)."""
    keep = (
        (tidy["status"] == "FINISHED")
        & tidy["duplicate_of"].isna()
        & ~tidy["study"].astype(bool)
        & tidy["role"].isin(S.ROLES)
        & tidy["preset"].notna()
        & tidy["dataset"].notna()
        & ((tidy["role"] != "train") | tidy["group"].notna())
    )
    return tidy[keep]


def _dedupe(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Keep the latest run per identity: a rerun supersedes, it adds no seed, and a
    duplicate (two processes that made one configuration twice) is counted once. Returns
    the kept rows and, per kept run, the notes on the runs it superseded.

    A run's identity is its config hash; a student's or ensemble's is that of what it was
    made from, read through the duplicates found so far: two KD students of one seed
    taught by two duplicate ensembles (each process made its own) are one identity,
    though their hashes name different teacher runs. Repeated until nothing changes (a
    generation per pass)."""
    alias: dict[str, str] = {}  # a superseded run id -> the run kept for its identity
    while True:
        keys = pd.Series([_identity(r, alias) for r in rows.itertuples(index=False)], index=rows.index)
        ordered = rows.assign(key=keys).sort_values(["start_time", "run_id"], ascending=False)
        winner = ordered.drop_duplicates("key").set_index("key")["run_id"]
        found = {r.run_id: winner[r.key] for r in ordered[ordered.duplicated("key")].itertuples()}
        if found == alias:
            break
        alias = found
    notes: dict[str, list[str]] = {}
    by_id = rows.set_index("run_id")
    for r in ordered[ordered.duplicated("key")].itertuples():
        kept = winner[r.key]
        notes.setdefault(kept, []).append(
            f"run {r.run_id} superseded by {kept} (same {_same(r, by_id.loc[kept])}, later start): counted once"
        )
    return rows[~rows["run_id"].isin(alias)], notes


def _made_from(r, alias: dict) -> tuple:
    """The runs a run was made from (its teacher, its members), each read as the run kept
    for its identity."""
    return (alias.get(r.teacher_run_id, r.teacher_run_id), *sorted(alias.get(m, m) for m in r.member_run_ids))


def _identity(r, alias: dict) -> str:
    """What makes a result the same. A train or joint run: its config hash. A student or
    an ensemble: what its hash holds (role, seed, combine, recipe, split), with its
    teacher and members read through ``alias``, so that one made from a superseded run is
    the same as one made from its kept twin. Without a hash or a recipe (hand-made
    records), who it is."""
    made = _made_from(r, alias)
    if r.role in ("student", "ensemble") and r.recipe is not None:
        digest_role = "student" if "student" in (r.role, r.member_role) else "train"
        recipe = r.recipe.digest(digest_role)
        # Not its group tag: a process may have derived it from its own copy of the teacher.
        return "|".join(map(str, (r.role, r.method, r.member_role, r.combine, r.seed, r.split_digest, recipe, *made)))
    if pd.notna(r.config_hash):
        return str(r.config_hash)
    return "|".join(map(str, (r.role, r.group, r.method, r.member_role, r.seed, r.member_seeds, *made)))


def _same(r, kept: pd.Series) -> str:
    if pd.notna(r.config_hash) and r.config_hash == kept["config_hash"]:
        return "config_hash"
    if pd.notna(r.config_hash):
        return "role, seed, recipe and teacher/members, whose duplicates count once"
    return "role, seed and teacher/members"


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
    return set(_differences(student.recipe, teacher.recipe, student.preset))


@functools.lru_cache(maxsize=1024)  # a study's students share a few (recipe, teacher recipe) pairs
def _differences(student: config.Recipe, teacher: config.Recipe, preset: str) -> tuple:
    own = config.PRESETS.get(preset, config.Recipe())
    reference = dataclasses.replace(teacher, **{k: getattr(own, k) for k in config.STUDENT_FIELDS})
    return tuple(config.shown(student.differences(reference, "student")))


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
    out = out[COLUMNS["ensembles"]].sort_values(["n_members", "members", "run_id"])
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


def _stat(row: str, frame: pd.DataFrame, table: str, gain: float, gain_over: str | None) -> dict:
    """One summary row of a table's runs: mean and sample std (NaN below two runs), and
    their seeds (or members' seeds), read where the table's declaration says."""
    runs = specs.OF_RUNS[table]
    seeds = [s if isinstance(s, str) else specs.fmt(s, "d") for s in frame[runs.seeds]]
    return {
        "row": row,
        "n": len(frame),
        "val_mean": frame[runs.val].mean(),
        "val_std": frame[runs.val].std(ddof=1),
        "test_mean": frame[runs.test].mean(),
        "test_std": frame[runs.test].std(ddof=1),
        "gain": gain,
        "gain_over": gain_over,
        "seeds": "; ".join(seeds) or None,
        "run_ids": list(frame["run_id"]),
    }


def _mean_of(n: int, what: str) -> str:
    """ "ensemble (mean)" over several runs, "ensemble" over one: no mean of one number."""
    return what if n == 1 else f"{what} (mean)"


def _summary(rows: dict) -> pd.DataFrame:
    """Means per kind of model over the counted ``rows``; each gain (test) sits on the row
    it describes and is the mean of the gains table's estimates for it
    (:func:`kd_mlflow.gains.estimates`: one source for both). Joint runs have one row per
    size and member seeds, never a mean across them."""
    est = gains_mod.estimates(**rows)

    def gain(kind: str) -> float:  # NaN for a kind without estimates (the single models)
        return est.loc[est["kind"] == kind, "estimate"].mean()

    single = "single models (mean)"
    lines = [  # (row, its table, its gains' kind, what they are over)
        ("single models", "seeds", "single", None),
        ("ensemble", "ensembles", "ensemble", single),
        ("KD students", "kd", "kd", single),
        ("SD students", "self_distillation", "sd_mean", "own teacher (mean of differences)"),
        ("SD ensemble", "sd_ensembles", "sd_ensemble", _mean_of(len(rows["ensembles"]), "ensemble")),
        # only where there is one: the tables of a study of one architecture keep their rows
        *([(gains_mod.ALONE, "alone", "alone", single)] if len(rows["alone"]) else []),
    ]
    stats = [_stat(row, rows[table], table, gain(kind), over) for row, table, kind, over in lines]
    for title, runs in gains_mod.joint_entries(rows["joint"]).items():
        members = runs["members"].iloc[0]
        over = gains_mod.same_seeds(rows["seeds"], members)
        what = "single models" + ("" if len(over) == len(rows["seeds"]) else f" of {gains_mod.seeds_of(members)}")
        stats.append(_stat(title, runs, "joint", gain(f"joint:{title}"), _mean_of(len(over), what)))
    return pd.DataFrame(stats, columns=COLUMNS["summary"])


def _study(
    head: dict, rows: pd.DataFrame, lookup: pd.DataFrame, in_line: set | None, notes: list, alone=None
) -> StudyTables:
    """One table set. ``in_line``: the listed runs that belong to this table's line (the
    others are listed with a note, counted in no mean or gain); None for a table of runs
    listed apart, which has no summary. ``alone``: the students' network trained alone."""
    alone = rows.iloc[:0] if alone is None else alone
    in_line = None if in_line is None else in_line | set(alone["run_id"])
    tables = {
        "seeds": _seeds(rows),
        "ensembles": _ensembles(rows, of_students=False),
        "kd": _kd(rows, lookup),
        "self_distillation": _self_distillation(rows, lookup),
        "sd_ensembles": _ensembles(rows, of_students=True),
        "joint": _of_members(rows[rows["role"] == S.JOINT]),
        "alone": _seeds(alone),
    }
    kd = rows[rows["run_id"].isin(tables["kd"]["run_id"])]
    notes = notes + [f"KD: {c}" for c in kd.get("sweep_kd_choice", pd.Series(dtype=object)).dropna()]
    if in_line is None:
        return StudyTables(**head, **tables, summary=pd.DataFrame(columns=COLUMNS["summary"]), notes=notes)
    summary = _summary(gains_mod.counted(tables, in_line))
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


def _table_places(rows: pd.DataFrame, at: dict, shared: pd.Series, groups: list, homes: set) -> list[Place]:
    """Every table's place, each train group's in order (the preset's own settings first):
    the places of its runs, and one per combine mode of its ensembles (or one, for the
    train runs alone) where no run of its own is listed with them."""
    own = {at[r] for r in rows.loc[~shared, "run_id"]} | homes  # a sweep's home: its teacher's place
    out = []
    for g in groups:
        mine = {p for p in own if p.group == g}
        ens = rows[shared & (rows["role"] == "ensemble") & (rows["group_of_line"] == g)]
        mine |= {Place(g, c) for c in set(ens["combine"]) if not any(p.combine == c for p in mine)}
        out += sorted(mine or {Place(g)}, key=lambda p: (p.combine != PLAIN, p.combine, p.settings))
    return out


def _partition(part: pd.DataFrame, sweeps: pd.DataFrame) -> list[StudyTables]:
    """The tables of one (preset, dataset): one per place, then the runs listed apart and,
    where several train groups leave no one table for them, the unattached ones. A table
    of one setting of a sweep (``sweeps``: the sweep parents) is marked, and the sweep is
    one table under its teacher's (:func:`_with_sweeps`)."""
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
    groups = sorted(lines, key=lambda g: (labels.get(g) not in (None, preset), str(labels.get(g)), g))
    kids = _sweep_kids(rows, sweeps)
    homes = {at[t] for t in rows.loc[kids, "teacher_run_id"] if t in at} - {APART, UNATTACHED}
    table_places = _table_places(rows, at, shared, groups, homes)
    # With one train group, a run whose teacher or member is not here is listed in its
    # first table, with a note, as before groups existed.
    home = {UNATTACHED: table_places[0]} if len(groups) == 1 else {}
    listed_at = rows["run_id"].map(lambda r: home.get(at[r], at[r]))
    lookup = part.set_index("run_id")

    def table(p: Place, mine: pd.DataFrame) -> StudyTables:
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
            "recipe": _recipe(line),
            "student_recipe": _student_recipe(mine),
        }
        notes = _notes(listed, superseded) + [f"{why[r]}; listed but counted in no mean or gain" for r in sorted(lost)]
        alone = _alone(rows, mine) if _arrow(line, mine) else None
        return _study(head, listed, lookup, set(listed["run_id"]) - lost, notes, alone)

    out: list[StudyTables] = []
    placed: list[Place | None] = []  # each table's place; None: a sweep setting's
    for p in [*table_places, APART, UNATTACHED]:
        mine = rows[listed_at.map(p.__eq__) & ~shared]
        if p in (APART, UNATTACHED):
            if len(mine):
                out.append(_apart(preset, dataset, p, mine, lookup, why, superseded))
                placed.append(p)
            continue
        swept = kids[mine.index]
        if swept.any():  # a sweep's setting: its full tables on --group only
            t = table(p, mine)
            sweep = str(mine.loc[swept, "parent_run_id"].iloc[0])
            out.append(dataclasses.replace(t, label=t.label + SETTING, setting_of=sweep))
            placed.append(None)
            if swept.all() and p not in homes:
                continue
        out.append(table(p, mine[~swept]))
        placed.append(p)
    out = _with_sweeps(out, placed, rows, at, sweeps)
    return [_point_to_students(t, out) for t in out]


SETTING = " · sweep setting"  # the label of a table of one setting of a sweep


def _sweep_kids(rows: pd.DataFrame, sweeps: pd.DataFrame) -> pd.Series:
    """The students nested under a sweep's parent, but for a study's KD student (the
    choice it reused, kd.sweep_kd_choice): one row each of their sweep's table."""
    return rows["parent_run_id"].isin(sweeps["run_id"]) & rows["sweep_kd_choice"].isna()


def _with_sweeps(tables: list[StudyTables], placed: list, rows: pd.DataFrame, at: dict, sweeps) -> list:
    """Each sweep as one table of its settings, under the table of its teacher's place
    (the first table where that is not one)."""
    found: dict[int, list] = {}
    for s in sweeps.itertuples():
        kids = rows[rows["parent_run_id"] == s.run_id]
        if kids.empty:
            continue
        teacher = at.get(kids["teacher_run_id"].iloc[0])
        i = placed.index(teacher) if teacher in placed else next(i for i, p in enumerate(placed) if p is not None)
        labels = {r.run_id: t.label for t in tables for r in t.kd.itertuples()}
        labels |= {r.run_id: t.label for t in tables for r in t.self_distillation.itertuples()}
        found.setdefault(i, []).append(_sweep_rows(s, kids, at, teacher, labels))
    return [
        dataclasses.replace(t, sweeps=pd.concat(found[i], ignore_index=True)) if i in found else t
        for i, t in enumerate(tables)
    ]


def _value(v) -> str:
    """A recipe value as a setting names it: 2.0 -> "2"."""
    return format(v, "g") if isinstance(v, float) else str(v)


def _sweep_rows(s, kids: pd.DataFrame, at: dict, home, labels: dict) -> pd.DataFrame:
    """One row per setting (select: the sweep's own rule of choice, on validation);
    a test accuracy for the chosen setting only."""

    inherited = set(home.settings) if isinstance(home, Place) else set()
    own = {r.run_id: [x for x in at[r.run_id].settings if x not in inherited] for r in kids.itertuples()}
    names = sorted({x.split("=")[0] for xs in own.values() for x in xs}, key=lambda n: (n not in TIE_ORDER, n))
    names = names or ["setting"]
    per_run = pd.DataFrame(
        [
            {
                **{n: getattr(r.recipe, n, "-") for n in names},
                "seed": r.seed,
                "val_acc": r.val_acc,
                "test_acc": r.test_acc,
                "run_id": r.run_id,
            }
            for r in kids.itertuples()
        ]
    )
    table = select(per_run, names)
    table = table.assign(
        sweep=s.name or s.run_id,
        setting=[", ".join(f"{n}={_value(getattr(r, n))}" for n in names) for r in table.itertuples()],
        test_mean=table["test_mean"].where(table["chosen"]),
        test_std=table["test_std"].where(table["chosen"]),
        label=[labels.get(ids[0]) for ids in table["run_ids"]],
        sweep_run_id=s.run_id,
    )
    return table[COLUMNS["sweeps"]]


def _point_to_students(t: StudyTables, tables: list[StudyTables]) -> StudyTables:
    """A table without KD (or SD) students whose train group has them in another table
    (another student architecture, other settings) says which tables hold them."""
    group = t.group_id.split("/")[0]
    notes = []
    for note in t.notes:
        kind = next((k for k in ("kd", "self_distillation") if note == _MISSING[k]), None)
        there = [
            f'"{o.label}"'
            for o in tables
            if kind
            and o is not t
            and o.setting_of is None
            and o.group_id.split("/")[0] == group
            and len(getattr(o, kind))
        ]
        notes.append(
            f"{note.removesuffix(' yet')} in this table: this group's are in {', '.join(there)}" if there else note
        )
    return dataclasses.replace(t, notes=notes)


def _alone(rows: pd.DataFrame, mine: pd.DataFrame) -> pd.DataFrame:
    """The train runs of the KD students' own training recipe and split (``reproduce
    --student-model`` trains them): their network without distillation."""
    kd = mine[(mine["role"] == "student") & (mine["method"] == "kd")]
    want = {(r.recipe.digest("train"), r.split_digest) for r in kd.itertuples() if r.recipe is not None}
    trains = rows[rows["role"] == "train"]
    found = [r.recipe is not None and (r.recipe.digest("train"), r.split_digest) in want for r in trains.itertuples()]
    return trains[found]


def _arrow(line: pd.DataFrame, mine: pd.DataFrame) -> str | None:
    """The arrow "resnet56 -> resnet20" where a table's students are not of its train runs'
    architecture; None where they are (or either is unknown)."""
    own = set(line.loc[line["role"] == "train", "model"].dropna())
    archs = set(mine.loc[mine["role"] == "student", "model"].dropna())
    return f"{'+'.join(sorted(own))} -> {'+'.join(sorted(archs))}" if own and archs and archs != own else None


def _recipe(line: pd.DataFrame) -> dict:
    """The train runs' recipe as they logged it: the recipe of the single models' rows."""
    trains = line[line["role"] == "train"]
    return dict(trains["params"].iloc[-1]) if len(trains) else {}


def _student_recipe(mine: pd.DataFrame) -> dict:
    """The students' recipe as they logged it (their distillation settings), where the
    table has students: the recipe of the student rows."""
    students = mine[mine["role"] == "student"]
    return dict(students["params"].iloc[-1]) if len(students) else {}


def _notes(listed: pd.DataFrame, superseded: dict) -> list[str]:
    return [n for r in listed["run_id"] for n in superseded.get(r, [])]


def _apart(preset, dataset, p: Place, rows, lookup, why: dict, superseded: dict) -> StudyTables:
    """The runs listed apart (mixed) or unattached: each with the reason, in no mean."""
    head = {"preset": preset, "dataset": dataset, "label": f"{preset} · {p.group}", "group_id": p.group, "recipe": {}}
    head["student_recipe"] = {}
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
    now: float | None = None,
) -> list[StudyTables]:
    """One StudyTables per group of comparable runs, optionally filtered; ``runs`` as
    :func:`kd_mlflow.runs.records_frame` makes it.

    Only FINISHED runs with a kd.role and without kd.duplicate_of or kd.study are
    results; [] when none is left and no run is unfinished. ``group`` keeps the groups
    whose label or id starts with it. With ``predictions`` (run id -> predictions.Predictions),
    every gain gets its intervals and the mechanism figures are filled in
    (:mod:`kd_mlflow.gains`). Runs not finished are listed in the table of their group
    (``now``: seconds since the epoch, for how long ago; the clock's by default).
    """
    if runs.empty:
        return []
    tidy = _tidy(runs)
    rows = _results(tidy)
    left = tidy[tidy["status"].isin(UNFINISHED)]
    for column, value in (("preset", preset), ("dataset", dataset)):
        if value is not None:
            rows, left = rows[rows[column] == value], left[left[column] == value]
    sweeps = tidy[tidy["sweep"].astype(bool) & (tidy["status"] == "FINISHED")]
    tables = [t for _, part in rows.groupby(["preset", "dataset"], sort=True) for t in _partition(part, sweeps)]
    tables = _with_unfinished(tables, left, time.time() if now is None else now)
    if group is None:  # a sweep's setting is a row of its sweep's table; its own tables on --group
        tables = [t for t in tables if t.setting_of is None]
    else:
        tables = [t for t in tables if _matches(t, group)]
    if predictions is not None:
        tables = [with_intervals(t, predictions) for t in tables]
    return tables


UNFINISHED = ("RUNNING", "FAILED", "KILLED")


def _matches(t: StudyTables, group: str) -> bool:
    """--group: a prefix of a table's label or id; a sweep setting's table by its whole
    label (a prefix such as the preset's name does not bring back every setting)."""
    if t.setting_of is not None:
        return t.label == group or t.group_id.startswith(group)
    return t.label.startswith(group) or t.group_id.startswith(group)


def _with_unfinished(tables: list[StudyTables], left: pd.DataFrame, now: float) -> list[StudyTables]:
    """Each run not finished in the table of its group (its kd.group, or the table that
    lists its teacher or a member), else the first table of its preset and dataset, else
    the first table; a table of its own where there is none."""
    homes: dict[int, list] = {}
    for r in left.itertuples(index=False):
        i = _home(tables, r)
        if i is None:
            tables = [*tables, _empty(r.preset, r.dataset, left.iloc[:0])]
            i = len(tables) - 1
        homes.setdefault(i, []).append(_unfinished_row(r, now))
    return [
        dataclasses.replace(t, unfinished=pd.DataFrame(homes[i], columns=COLUMNS["unfinished"])) if i in homes else t
        for i, t in enumerate(tables)
    ]


def _home(tables: list[StudyTables], r) -> int | None:
    ids = {r.teacher_run_id, *r.member_run_ids} - {None}
    # (not a sweep setting's table: it is shown on --group only)
    same = [i for i, t in enumerate(tables) if (t.preset, t.dataset) == (r.preset, r.dataset) and not t.setting_of]
    for i in same:
        if tables[i].group_id.split("/")[0] == r.group or ids & set(run_ids([tables[i]])):
            return i
    if same:
        return same[0]
    visible = [i for i, t in enumerate(tables) if not t.setting_of]
    return visible[0] if visible and pd.isna(r.preset) else None


def _empty(preset, dataset, none: pd.DataFrame) -> StudyTables:
    """A table for runs not finished of a preset and dataset with no finished result."""
    preset, dataset = (x if isinstance(x, str) else "-" for x in (preset, dataset))
    head = {"preset": preset, "dataset": dataset, "label": f"{preset} (no finished runs)", "group_id": "-"}
    return _study({**head, "recipe": {}}, none, none.set_index("run_id"), None, [])


def _unfinished_row(r, now: float) -> dict:
    role = r.role if isinstance(r.role, str) else ("study" if r.study else "-")
    return {"status": r.status, "role": role, "name": r.name, "since": _since(r, now), "run_id": r.run_id}


def _since(r, now: float) -> str:
    """How long a run has been silent: its last metric (or start) for a RUNNING run, its
    end for a FAILED or KILLED one."""
    start, seen = r.start_time / 1000, getattr(r, "last_seen", r.start_time) / 1000
    end = getattr(r, "end_time", 0) / 1000
    if r.status != "RUNNING":
        return f"ended {_ago(now - end)} ago" if end else f"started {_ago(now - start)} ago"
    if seen > start:
        return f"last metric {_ago(now - seen)} ago (started {_ago(now - start)} ago)"
    return f"no metric yet, started {_ago(now - start)} ago"


def _ago(seconds: float) -> str:
    """ "45 s", "12 min", "3.5 h", "2.0 days"."""
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days"


def with_intervals(t: StudyTables, predictions: dict) -> StudyTables:
    g, m, notes = gains_mod.compute(t, predictions)
    figure1, calibration, size = measures.compute(t, predictions)
    notes += measures.floored(calibration, predictions)
    return dataclasses.replace(
        t, gains=g, mechanism=m, figure1=figure1, calibration=calibration, ensemble_size=size, notes=t.notes + notes
    )


def render(tables: list[StudyTables], fmt: str, table: str | None = None) -> str:
    """The tables as ``markdown``, ``json`` or ``csv`` text; as CSV one table, ``table``
    (by default the per-run table: :data:`kd_mlflow.tables.CSV_TABLES`)."""
    if fmt == "markdown":
        return specs.markdown(tables)
    if fmt == "csv":
        return specs.csv(tables, table or specs.RUNS)
    if fmt == "json":
        return specs.to_json(tables)
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(config.FORMATS)}")


# --- a sweep's choice, on validation only (the sweep command's and these tables') ---

TIE_ORDER = ("temperature", "alpha")  # smaller first, on equal validation means


def select(rows: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per setting, from one row per child run (columns: the grid's fields,
    ``seed``, ``val_acc``, ``test_acc``, ``run_id``): n, validation and test mean and
    std, the run ids, and ``chosen`` on the setting of highest mean validation accuracy.
    Test accuracy never takes part in the choice."""
    table = (
        rows.groupby(names, sort=True)
        .agg(
            n=("run_id", "size"),
            val_mean=("val_acc", "mean"),
            val_std=("val_acc", "std"),
            test_mean=("test_acc", "mean"),
            test_std=("test_acc", "std"),
            run_ids=("run_id", list),
        )
        .reset_index()
    )
    order = [n for n in TIE_ORDER if n in names] + [n for n in names if n not in TIE_ORDER]
    ranked = table.sort_values(["val_mean", *order], ascending=[False] + [True] * len(order), kind="mergesort")
    table["chosen"] = table.index == ranked.index[0]
    return table


def chosen(table: pd.DataFrame) -> pd.Series:
    return table[table["chosen"]].iloc[0]
