"""From a runs DataFrame, as ``mlflow.search_runs(output_format="pandas")``
returns it, to the study's tables: single models, ensembles, KD and SD students
and a summary, per (preset, dataset) group.

Pure pandas, no MLflow and no torch: the CLI fetches the runs and this module
only reads them, so it is tested on hand-made frames as well as on real runs.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from kd_mlflow import gains as gains_mod
from kd_mlflow import schema as S
from kd_mlflow.config import architecture

FORMATS = ("markdown", "csv", "json")
TABLES = ("seeds", "ensembles", "kd", "self_distillation", "sd_ensembles", "summary", "gains", "mechanism")
_ENSEMBLE_COLUMNS = ["members", "n_members", "val_acc", "test_acc", "run_id"]
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
    "summary": ["row", "n", "val_mean", "val_std", "test_mean", "test_std", "gain", "gain_over", "run_ids"],
}
_MISSING = {
    "seeds": "no finished train runs",
    "ensembles": "no ensemble of train runs yet",
    "kd": "no KD student (kd.method=kd) yet",
    "self_distillation": "no SD student (kd.method=sd) yet",
    "sd_ensembles": "no ensemble of SD students yet",
}
# Tidy column name -> MLflow tag key.
_TAGS = {
    "role": S.ROLE,
    "method": S.METHOD,
    "preset": S.PRESET,
    "dataset": S.DATASET,
    "config_hash": S.CONFIG_HASH,
    "teacher_run_id": S.TEACHER_RUN_ID,
    "teacher_seeds": S.TEACHER_SEEDS,
    "teacher_model": S.TEACHER_MODEL,
    "member_seeds": S.MEMBER_SEEDS,
    "member_run_ids": S.MEMBER_RUN_IDS,
    "member_role": S.MEMBER_ROLE,
    "duplicate_of": S.DUPLICATE_OF,
    "study": S.STUDY,
    "group": S.GROUP,
    "group_label": S.GROUP_LABEL,
}
NO_GROUP = "-"  # runs logged before groups existed: grouped by preset and dataset alone


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


# --- reading the runs frame -------------------------------------------------


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """``runs[name]``, or all missing: search_runs omits keys no run has."""
    if name in runs.columns:
        return runs[name]
    return pd.Series(None, index=runs.index, dtype=object)


def _text(runs: pd.DataFrame, name: str) -> pd.Series:
    """A tag or param as strings; an empty string counts as missing."""
    col = _column(runs, name).astype(object)
    return col.where(col.notna() & (col.astype(str).str.strip() != ""), None)


def _int(values: pd.Series) -> pd.Series:
    """Seeds as nullable ints (tags and params are strings)."""
    return pd.to_numeric(values, errors="coerce").astype("Int64")


def _members(seeds: pd.Series) -> pd.Series:
    """Normalise "0, 1,2" to "0,1,2" so equal member lists compare equal."""
    return seeds.map(lambda s: None if s is None else ",".join(p.strip() for p in s.split(",")))


def _tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with plain column names."""
    out = pd.DataFrame({k: _text(runs, f"tags.{v}") for k, v in _TAGS.items()}, index=runs.index)
    out["member_seeds"] = _members(out["member_seeds"])
    out["run_id"] = _column(runs, "run_id")
    out["status"] = _column(runs, "status")
    out["start_time"] = _column(runs, "start_time")
    seed = _text(runs, f"tags.{S.SEED}")
    out["seed"] = _int(seed.where(seed.notna(), _text(runs, "params.seed")))
    for name, key in (("val_acc", S.FINAL_VAL_ACC), ("test_acc", S.FINAL_TEST_ACC)):
        out[name] = pd.to_numeric(_column(runs, f"metrics.{key}"), errors="coerce").astype(float)
    out["combine"] = _text(runs, "params.combine").fillna("prob")
    model, width = _text(runs, "params.model"), _int(_text(runs, "params.width")).fillna(64)
    out["model"] = [None if m is None else architecture(m, int(w)) for m, w in zip(model, width, strict=True)]
    out["group"] = out["group"].fillna(NO_GROUP)
    params = [c for c in runs.columns if c.startswith("params.")]
    out["recipe"] = (
        [
            dict(sorted((k[len("params.") :], v) for k, v in row.items() if isinstance(v, str) and v != ""))
            for row in runs[params].to_dict("records")
        ]
        if params
        else [{} for _ in range(len(out))]
    )
    return out


def _results(tidy: pd.DataFrame) -> pd.DataFrame:
    """FINISHED kd-mlflow runs that are results, not pointers or study parents."""
    keep = (
        (tidy["status"] == "FINISHED")
        & tidy["duplicate_of"].isna()
        & tidy["study"].isna()
        & tidy["role"].notna()
        & tidy["preset"].notna()
        & tidy["dataset"].notna()
    )
    return tidy[keep]


def _dedupe(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep the latest run per identity: a rerun supersedes, it adds no seed."""
    # Without a config hash, what makes a result the same is who it is.
    who = rows[["role", "method", "member_role", "seed", "teacher_run_id", "member_seeds"]]
    identity = pd.Series(["|".join(map(str, r)) for r in who.itertuples(index=False)], index=rows.index)
    rows = rows.assign(key=rows["config_hash"].where(rows["config_hash"].notna(), identity))
    ordered = rows.sort_values(["start_time", "run_id"], ascending=False)  # missing times last
    winner = ordered.drop_duplicates("key").set_index("key")["run_id"]
    notes = [
        f"run {r.run_id} superseded by {winner[r.key]} (same "
        f"{'config_hash' if pd.notna(r.config_hash) else 'role, seed and teacher/members'}, later start)"
        for r in ordered[ordered.duplicated("key")].itertuples()
    ]
    return rows[rows["run_id"].isin(winner)], notes


# --- the tables -----------------------------------------------------------


def _seeds(rows: pd.DataFrame) -> pd.DataFrame:
    t = rows[rows["role"] == "train"]
    return t[COLUMNS["seeds"]].sort_values(["seed", "run_id"]).reset_index(drop=True)


def _ensembles(rows: pd.DataFrame, member_role: str) -> pd.DataFrame:
    t = rows[(rows["role"] == "ensemble") & (rows["member_role"] == member_role)]
    members = t["member_seeds"].where(t["member_seeds"].notna(), t["member_run_ids"])
    out = t.assign(
        members=t["member_seeds"],
        n_members=_int(members.map(lambda m: None if m is None else len(m.split(",")))),
    )
    out = out[_ENSEMBLE_COLUMNS].sort_values(["n_members", "members", "run_id"])
    return out.reset_index(drop=True)


def _teachers(students: pd.DataFrame, pool: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Each student's teacher row, aligned with ``students``; NaN when not found.

    The pool is every finished result of the group before de-duplication: a
    student learned from the run it names, even if a rerun superseded it.
    """
    by_id = pool.drop_duplicates("run_id").set_index("run_id")
    teachers = by_id.reindex(students["teacher_run_id"].to_numpy())
    teachers.index = students.index
    lost = students[~students["teacher_run_id"].isin(pool["run_id"])]
    notes = [
        f"teacher {r.teacher_run_id} of student {r.run_id} is not a finished run of this group"
        for r in lost.itertuples()
    ]
    return teachers, notes


def _arrows(students: pd.DataFrame, teacher: pd.DataFrame) -> pd.Series:
    """The "teacher -> student" architectures: the teacher's from the student's tag
    (kd.teacher_model), else (runs logged before it) from the teacher's own run."""
    t_arch = students["teacher_model"].where(students["teacher_model"].notna(), teacher["model"])
    pairs = zip(t_arch, students["model"], strict=True)
    return pd.Series(
        [None if pd.isna(a) or pd.isna(b) else f"{a} -> {b}" for a, b in pairs], index=students.index, dtype=object
    )


def _kd(rows: pd.DataFrame, pool: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    t = rows[(rows["role"] == "student") & (rows["method"] == "kd")]
    teacher, notes = _teachers(t, pool)
    seeds = t["teacher_seeds"].where(t["teacher_seeds"].notna(), teacher["member_seeds"])
    out = t.assign(
        teacher_seeds=_members(seeds),
        teacher_val_acc=teacher["val_acc"],
        teacher_test_acc=teacher["test_acc"],
        architectures=_arrows(t, teacher),
    )
    return out[COLUMNS["kd"]].sort_values(["seed", "run_id"]).reset_index(drop=True), notes


def _self_distillation(rows: pd.DataFrame, pool: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    t = rows[(rows["role"] == "student") & (rows["method"] == "sd")]
    teacher, notes = _teachers(t, pool)
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
    return out.reset_index(drop=True), notes


def _stat(
    row: str,
    val: pd.Series,
    test: pd.Series,
    run_ids: pd.Series,
    gain: float = float("nan"),
    gain_over: str | None = None,
) -> dict:
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


def _summary(seeds, ensembles, kd, self_distillation, sd_ensembles) -> pd.DataFrame:
    """Means per kind of model; each gain (test) sits on the row it describes. The SD
    row's mean and gain are over the same set: the students whose teacher was found."""
    sd = self_distillation[self_distillation["teacher_test_acc"].notna()]
    single = seeds["test_acc"].mean()
    ensemble = ensembles["test_acc"].mean()
    return pd.DataFrame(
        [
            _stat("single models", seeds["val_acc"], seeds["test_acc"], seeds["run_id"]),
            _stat(
                "ensemble",
                ensembles["val_acc"],
                ensembles["test_acc"],
                ensembles["run_id"],
                ensemble - single,
                "single models (mean)",
            ),
            _stat(
                "KD students",
                kd["val_acc"],
                kd["test_acc"],
                kd["run_id"],
                kd["test_acc"].mean() - single,
                "single models (mean)",
            ),
            _stat(
                "SD students",
                sd["student_val_acc"],
                sd["student_test_acc"],
                sd["run_id"],
                sd["gain"].mean(),
                "own teacher (mean of differences)",
            ),
            _stat(
                "SD ensemble",
                sd_ensembles["val_acc"],
                sd_ensembles["test_acc"],
                sd_ensembles["run_id"],
                sd_ensembles["test_acc"].mean() - ensemble,
                "ensemble (mean)",
            ),
        ],
        columns=COLUMNS["summary"],
    )


def _study(key: tuple, pool: pd.DataFrame) -> StudyTables:
    preset, dataset, label, group_id, recipe = key
    rows, notes = _dedupe(pool)
    kd, kd_notes = _kd(rows, pool)
    sd, sd_notes = _self_distillation(rows, pool)
    tables = {
        "seeds": _seeds(rows),
        "ensembles": _ensembles(rows, "train"),
        "kd": kd,
        "self_distillation": sd,
        "sd_ensembles": _ensembles(rows, "student"),
    }
    lost = [
        n.replace(
            "is not a finished run of this group",
            "is not a finished run of this group; the student is listed but counted in no mean or gain",
        )
        for n in sd_notes
    ]
    notes += kd_notes + lost + [m for k, m in _MISSING.items() if tables[k].empty]
    return StudyTables(preset, dataset, label, group_id, recipe, **tables, summary=_summary(**tables), notes=notes)


def _variant_label(base: str, combine: str, student_label: str | None, arrow: str | None = None) -> str:
    """The train group's label, and what the variant changes: the ensemble's combine
    mode, the students' settings, and (``arrow``) "resnet56 -> resnet20" where the
    students' architecture is not their teachers' (it then stands for model= and width=)."""
    parts = [base]
    if combine != "prob":
        parts.append(f"ensemble: {combine}")
    if student_label:
        shape = ("model=", "width=") if arrow else ()
        extra = [p for p in student_label.split(" · ")[1:] if p not in base.split(" · ") and not p.startswith(shape)]
        if extra:
            parts.append("students: " + ", ".join(extra))
    if arrow:
        parts.append(arrow)
    return " · ".join(parts)


def _groups_of(part: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame, list[str]]]:
    """Within one (preset, dataset): one entry per train group and variant (ensemble
    combine mode, students' settings), each with the runs that belong to it by lineage."""
    preset, dataset = part["preset"].iloc[0], part["dataset"].iloc[0]
    trains = part[part["role"] == "train"]
    ens = part[part["role"] == "ensemble"]
    students = part[part["role"] == "student"]
    labels = trains.groupby("group")["group_label"].first()
    # The preset's own recipe first, then the variants by label.
    train_groups = sorted(
        trains["group"].unique(), key=lambda g: (labels.get(g) not in (None, preset), str(labels.get(g)), g)
    ) or [NO_GROUP]
    single = len(train_groups) == 1
    out = []
    for g in train_groups:
        g_train = trains[trains["group"] == g]
        ids = set(g_train["run_id"])

        def members_in(frame, pool_ids):
            inside = frame["member_run_ids"].map(lambda m: m is not None and set(m.split(",")) <= pool_ids)
            return frame.loc[inside.astype(bool)]

        g_ens = members_in(ens[ens["member_role"] == "train"], ids)
        sd = students[(students["method"] == "sd") & students["teacher_run_id"].isin(ids)]
        # KD: of an ensemble, or of one network of another architecture.
        kd = students[(students["method"] == "kd") & students["teacher_run_id"].isin(set(g_ens["run_id"]) | ids)]
        if single:  # unattached runs of this preset and dataset: listed here, with a note
            attached = set(g_ens["run_id"]) | set(sd["run_id"]) | set(kd["run_id"])
            loose = part[(part["role"] != "train") & ~part["run_id"].isin(attached)]
            sd = pd.concat([sd, loose[(loose["role"] == "student") & (loose["method"] == "sd")]])
            kd = pd.concat([kd, loose[(loose["role"] == "student") & (loose["method"] == "kd")]])
            g_ens = pd.concat([g_ens, loose[(loose["role"] == "ensemble") & (loose["member_role"] == "train")]])
        base = g_train["group_label"].dropna().iloc[0] if g_train["group_label"].notna().any() else preset
        # The preset's own settings first: that variant keeps the train group's id.
        s_labels = sorted(
            {lbl for lbl in pd.concat([sd, kd])["group_label"].fillna("")}, key=lambda lbl: (lbl not in ("", base), lbl)
        ) or [""]
        combines = sorted(set(g_ens["combine"]), key=lambda c: (c != "prob", c)) or ["prob"]
        recipe = g_train["recipe"].iloc[-1] if len(g_train) else {}
        for c in combines:
            for lbl in s_labels:
                v_ens = g_ens[g_ens["combine"] == c]
                v_kd = kd[
                    (kd["group_label"].fillna("") == lbl) & kd["teacher_run_id"].isin(set(v_ens["run_id"]))
                    | (kd["group_label"].fillna("") == lbl) & ~kd["teacher_run_id"].isin(set(ens["run_id"]))
                ]
                v_sd = sd[sd["group_label"].fillna("") == lbl]
                sd_ids = set(students[students["group_label"].fillna("") == lbl]["run_id"])
                v_sd_ens = members_in(ens[(ens["member_role"] == "student") & (ens["combine"] == c)], sd_ids)
                pool = pd.concat([g_train, v_ens, v_kd, v_sd, v_sd_ens]).drop_duplicates("run_id")
                full = dict(recipe)
                if lbl and len(v_sd) + len(v_kd):
                    full.update(pd.concat([v_sd, v_kd])["recipe"].iloc[-1])
                archs = set(pd.concat([v_sd, v_kd])["model"].dropna())
                own = set(g_train["model"].dropna())
                arrow = (
                    f"{'+'.join(sorted(own))} -> {'+'.join(sorted(archs))}" if own and archs and archs != own else None
                )
                label = _variant_label(base, c, lbl, arrow)
                gid = g if (c, lbl) == (combines[0], s_labels[0]) else f"{g}/{c}/{lbl}"
                out.append(((preset, dataset, label, gid, full), pool))
    return out


def build_tables(
    runs: pd.DataFrame,
    preset: str | None = None,
    dataset: str | None = None,
    group: str | None = None,
    predictions: dict | None = None,
) -> list[StudyTables]:
    """One StudyTables per group of comparable runs, optionally filtered.

    Only FINISHED runs with a kd.role and without kd.duplicate_of or kd.study are
    results; [] when none is left. ``group`` keeps the groups whose label or id starts
    with it. With ``predictions`` (run id -> predictions.Predictions), every gain gets
    its intervals and the mechanism figures are filled in (:mod:`kd_mlflow.gains`).
    """
    rows = _results(_tidy(runs))
    if preset is not None:
        rows = rows[rows["preset"] == preset]
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
    tables = []
    for _, part in rows.groupby(["preset", "dataset"], sort=True):
        for key, pool in _groups_of(part):
            tables.append(_study(key, pool))
    if group is not None:
        tables = [t for t in tables if t.label.startswith(group) or t.group_id.startswith(group)]
    if predictions is not None:
        tables = [with_intervals(t, predictions) for t in tables]
    return tables


def with_intervals(t: StudyTables, predictions: dict) -> StudyTables:
    g, m, notes = gains_mod.compute(t, predictions)
    return dataclasses.replace(t, gains=g, mechanism=m, notes=t.notes + notes)


def run_ids(tables: list[StudyTables]) -> list[str]:
    """Every run a set of tables names (for fetching their predictions)."""
    ids = []
    for t in tables:
        ids += list(t.seeds["run_id"]) + list(t.ensembles["run_id"]) + list(t.kd["run_id"])
        ids += list(t.self_distillation["run_id"]) + list(t.self_distillation["teacher_run_id"].dropna())
        ids += list(t.sd_ensembles["run_id"])
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


def _markdown(tables: list[StudyTables]) -> str:
    if not tables:
        return "no finished runs\n"
    parts = []
    for t in tables:
        parts.append(f"## {t.label} ({t.dataset})\n\ngroup `{t.group_id}`")
        parts += [f"### {title}\n\n{table}" for title, table in _md_sections(t)]
        parts += [f"### {title}\n\n{table}" for title, table in _md_uncertainty(t)]
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
    out = {name: [] for name in (*TABLES, "notes")}
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
]


def _csv(tables: list[StudyTables]) -> str:
    """Tidy: one row per run and table it appears in, so that ``pandas.read_csv`` gives
    a frame ready to pivot (summaries and notes are in the markdown and JSON)."""
    rows = []
    for t in tables:
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
        for section, frame in (("ensembles", t.ensembles), ("sd_ensembles", t.sd_ensembles)):
            for r in frame.itertuples():
                rows.append(
                    {
                        **g,
                        "section": section,
                        "role": "ensemble",
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
        for g in t.gains[t.gains["run_id"].notna()].itertuples():
            for row in rows:
                if row["run_id"] == g.run_id and row["group_id"] == t.group_id:
                    row.update(
                        gain=g.estimate, gain_lo=g.lo, gain_hi=g.hi, mcnemar_p=None if pd.isna(g.p_value) else g.p_value
                    )
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for col in ("seed", "teacher_seed"):
        frame[col] = pd.array(frame[col].map(lambda v: None if v is None or pd.isna(v) else int(v)), dtype="Int64")
    return frame.to_csv(index=False)


def render(tables: list[StudyTables], fmt: str) -> str:
    """The tables as ``markdown``, ``csv`` or ``json`` text."""
    if fmt == "markdown":
        return _markdown(tables)
    if fmt == "csv":
        return _csv(tables)
    if fmt == "json":
        return json.dumps(table_rows(tables), indent=2, allow_nan=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
