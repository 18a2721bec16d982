"""compare's tables, each declared once: its title, its columns (the frame's column, its
markdown header and how a cell is written) and the runs it lists. The markdown, CSV and
JSON renderers read these declarations and nothing else, so a new column is one line
here plus its value in the builder (:mod:`kd_mlflow.compare`, :mod:`kd_mlflow.gains`,
:mod:`kd_mlflow.measures`). Pure pandas, no MLflow and no torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pandas as pd

from .config import ConfigError
from .stats import fmt_interval

TEXT = "s"  # a cell written as it is ("-" where missing)


@dataclasses.dataclass(frozen=True)
class Col:
    """A column: ``name`` in the frame, CSV and JSON; ``header`` in markdown (None: in
    CSV and JSON only); ``fmt`` a format spec of its value or a function of the row (a
    cell made of several columns); ``optional``: a transposed table's row shown only
    where some column has it."""

    name: str
    header: str | None = None
    fmt: str | Callable = ".2f"
    optional: bool = False

    def cell(self, row) -> str:
        return self.fmt(row) if callable(self.fmt) else fmt(getattr(row, self.name), self.fmt)


@dataclasses.dataclass(frozen=True)
class Runs:
    """The runs a table lists, one per row (its ``run_id``): the columns of their seed (or
    members' seeds) and accuracies, and the other runs it names as (id column, that run's
    test accuracy column or None)."""

    seeds: str = "seed"
    val: str = "val_acc"
    test: str = "test_acc"
    also: tuple = ()


@dataclasses.dataclass(frozen=True)
class Table:
    """One table: ``title`` (a function of the rows where they name it; None: not in
    markdown), its columns, its runs; ``always``: shown as a row of dashes when empty;
    ``split``: one markdown table per value of this column; ``transposed``: the column
    whose values head the markdown columns, one markdown row per shown column."""

    name: str
    title: str | Callable | None
    columns: tuple[Col, ...]
    runs: Runs | None = None
    always: bool = False
    split: str | None = None
    transposed: str | None = None
    students: bool = False  # its rows are students (or made of them): they carry the students' recipe

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def markdown(self, frame: pd.DataFrame) -> list[tuple[str, str]]:
        """(title, pipe table) pairs: none where it is empty and not ``always``."""
        if self.title is None or (frame.empty and not self.always):
            return []
        if self.split is not None:
            parts = [part for _, part in frame.groupby(self.split, sort=False)]
            return [(self._title(part), self._md(part)) for part in parts]
        return [(self._title(frame), self._md(frame))]

    def _title(self, frame: pd.DataFrame) -> str:
        return self.title(frame) if callable(self.title) else str(self.title)

    def _md(self, frame: pd.DataFrame) -> str:
        rows = list(frame.itertuples())
        if self.transposed is not None:
            shown = [
                c for c in self.columns if c.header is not None and not (c.optional and frame[c.name].isna().all())
            ]
            return _md_table(
                ["", *frame[self.transposed]], [[str(c.header), *(c.cell(r) for r in rows)] for c in shown]
            )
        shown = [c for c in self.columns if c.header is not None]
        return _md_table([str(c.header) for c in shown], [[c.cell(r) for c in shown] for r in rows])


def data(*names: str) -> tuple[Col, ...]:
    """Columns in CSV and JSON only."""
    return tuple(Col(n) for n in names)


def fmt(value, spec: str = ".2f") -> str:
    """A cell: "-" for a missing value."""
    if value is None or (not isinstance(value, (str, list)) and pd.isna(value)):
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table; a row of dashes stands for a piece not run yet."""
    lines = [header, ["---"] * len(header), *(rows or [["-"] * len(header)])]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


# --- cells made of several columns --------------------------------------------


def _pm(mean, std) -> str:
    return fmt(mean) + ("" if pd.isna(std) else f" ± {std:.2f}")


def _bracket(value, lo, hi, spec: str) -> str:
    """ "+0.43 [-0.12, +0.98]": a value and its interval, "-" where there is no value."""
    if pd.isna(value):
        return "-"
    return format(value, spec) + ("" if pd.isna(lo) else f" [{lo:{spec}}, {hi:{spec}}]")


def _acc_cell(r) -> str:
    """ "85.95 ± 0.37 [85.49, 86.41]": a column's mean, its std and t-interval over seeds."""
    if pd.isna(r.test_acc):
        return "-"
    std = "" if pd.isna(r.test_std) else f" ± {r.test_std:.2f}"
    seeds = "" if pd.isna(r.seed_lo) else f" [{r.seed_lo:.2f}, {r.seed_hi:.2f}]"
    return f"{r.test_acc:.2f}{std}{seeds}"


def _spread(name: str, spec: str) -> Callable:
    """The cell "85.10 [84.00, 86.20]": ``name``'s mean, then its min and max."""

    def cell(r) -> str:
        mean, lo, hi = (getattr(r, f"{name}_{x}") for x in ("mean", "min", "max"))
        return f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"

    return cell


def _arch_note(students: pd.DataFrame) -> str:
    """The teacher -> student architectures for a table's title: ": resnet56 -> resnet20"."""
    arrows = list(dict.fromkeys(students["architectures"].dropna()))
    return f": {', '.join(arrows)}" if arrows else ""


def _mechanism_value(r) -> str:
    spec = ".3f" if r.detail == "nats" else ".2f"
    # (a ratio of gains can be undefined where its interval is not: "- [lo, hi]")
    return fmt(r.value, spec) + ("" if pd.isna(r.lo) else f" [{r.lo:{spec}}, {r.hi:{spec}}]")


# --- the declarations -----------------------------------------------------------

_ACC = (Col("val_acc", "validation accuracy"), Col("test_acc", "test accuracy"))
_TEACHER = (Col("teacher_val_acc", "validation accuracy"), Col("teacher_test_acc", "test accuracy"))
_OF_MEMBERS = (Col("members", "members", TEXT), Col("n_members"), *_ACC, Col("run_id"), Col("member_run_ids"))
_MEMBERS = Runs(seeds="members", also=(("member_run_ids", None),))

SEEDS = Table("seeds", "Single models", (Col("seed", "seed", "d"), *_ACC, Col("run_id")), Runs(), always=True)
ENSEMBLES = Table("ensembles", "Ensemble of single models", _OF_MEMBERS, _MEMBERS, always=True)
KD = Table(
    "kd",
    lambda kd: "Knowledge distillation (teacher left, student right)" + _arch_note(kd),
    (
        Col("teacher_seeds", "seed", TEXT),
        *_TEACHER,
        Col("seed", "seed", "d"),
        *_ACC,
        *data("architectures", "teacher_run_id", "run_id"),
    ),
    Runs(also=(("teacher_run_id", "teacher_test_acc"),)),
    always=True,
    students=True,
)
SELF_DISTILLATION = Table(
    "self_distillation",
    lambda sd: "Self-distillation (teacher left, student right)" + _arch_note(sd),
    (
        Col("teacher_seed", "seed", "d"),
        *_TEACHER,
        Col("student_seed", "seed", "d"),
        Col("student_val_acc", "validation accuracy"),
        Col("student_test_acc", "test accuracy"),
        *data("gain", "architectures", "teacher_run_id", "run_id"),
    ),
    Runs("student_seed", "student_val_acc", "student_test_acc", (("teacher_run_id", "teacher_test_acc"),)),
    always=True,
    students=True,
)
SD_ENSEMBLES = Table("sd_ensembles", "Ensemble of SD students", _OF_MEMBERS, _MEMBERS, always=True, students=True)
JOINT = Table("joint", None, _OF_MEMBERS, Runs(seeds="members"))
# The KD students' network trained alone: in no rendered table, a baseline of the gains.
ALONE = dataclasses.replace(SEEDS, name="alone", title=None)
SUMMARY = Table(
    "summary",
    "Summary (gain: test accuracy)",
    (
        Col("row", "", TEXT),
        Col("n", "n", "d"),
        Col("val_mean", "validation mean"),
        Col("val_std", "validation std"),
        Col("test_mean", "test mean"),
        Col("test_std", "test std"),
        Col("gain", "gain", "+.2f"),
        Col("gain_over", "gain over", TEXT),
        Col("seeds", "seeds", TEXT),
        Col("run_ids"),
    ),
    always=True,
)
SWEEPS = Table(
    "sweeps",
    lambda sweep: f"Sweep {sweep['sweep'].iloc[0]} (chosen on validation; test of the chosen only)",
    (
        Col("sweep"),
        Col("setting", "setting", TEXT),
        Col("n", "n", "d"),
        Col("val_mean", "validation (mean ± std)", lambda r: _pm(r.val_mean, r.val_std)),
        Col("val_std"),
        # the test accuracy of the chosen setting only (a setting's full tables: compare --group LABEL)
        Col("test_mean", "test (mean ± std)", lambda r: _pm(r.test_mean, r.test_std) if r.chosen else "·"),
        Col("test_std"),
        Col("chosen", "", lambda r: "chosen" if r.chosen else ""),
        Col("label", "its tables: compare --group", lambda r: f"`{r.label}`" if isinstance(r.label, str) else "-"),
        *data("run_ids", "sweep_run_id"),
    ),
    split="sweep",
)
GAINS = Table(
    "gains",
    "Gains with 95% intervals (test accuracy, points)",
    (
        Col("gain", "gain", TEXT),
        Col("estimate", "estimate [95% bootstrap]", lambda r: fmt_interval(r.estimate, r.lo, r.hi)),
        *data("lo", "hi"),
        Col("interval", "resampled", TEXT),
        Col(
            "seed_lo",
            "[95% t over pairs or KD seeds]",
            lambda r: "-" if pd.isna(r.seed_lo) else fmt_interval(r.estimate, r.seed_lo, r.seed_hi),
        ),
        *data("seed_hi", "n"),
        Col(
            "p_value",
            "McNemar p (teacher-only / student-only right)",
            lambda r: "-" if pd.isna(r.p_value) else f"{r.p_value:.3g} ({int(r.b)}/{int(r.c)})",
        ),
        *data("b", "c", "run_id", "over_run_ids"),
    ),
)
MECHANISM = Table(
    "mechanism",
    "Mechanism (test set)",
    (
        Col("figure", "figure", TEXT),
        Col("value", "value", _mechanism_value),
        *data("lo", "hi", "n"),
        Col("detail", "unit", TEXT),
        Col("run_id"),
    ),
)
FIGURE1 = Table(
    "figure1",
    "Figure 1 (test accuracy, %; Allen-Zhu and Li, ICLR 2023)",
    (
        *data("column", "title"),
        Col("n", "runs", "d"),
        Col("test_acc", "test accuracy (mean ± std [95% t over seeds])", _acc_cell),
        *data("test_std", "seed_lo", "seed_hi"),
        Col(
            # the gains table's interval: seeds × images where both sides are several runs
            "gain",
            "gain over mean single [95% bootstrap: images; seeds × images for several runs]",
            lambda r: _bracket(r.gain, r.gain_lo, r.gain_hi, "+.2f"),
        ),
        *data("gain_lo", "gain_hi"),
        Col("report", "the report (ResNet-18, CIFAR-10)", optional=True),
        Col("paper", "the paper (WRN-28-10, CIFAR-10)", optional=True),
        *data("run_ids", "over_run_ids"),
    ),
    transposed="title",
)
CALIBRATION = Table(
    "calibration",
    "Calibration (test set; means over runs)",
    (
        Col("row", "", TEXT),
        Col("n", "n", "d"),
        Col("nll", "NLL (nats)", ".4f"),
        Col("ece", "ECE (15 bins)", ".4f"),
        Col("brier", "Brier", ".4f"),
        Col(
            "nll_gain",
            "NLL gain: mean single (SD: own teacher) - this [95% paired bootstrap]",
            lambda r: _bracket(r.nll_gain, r.nll_gain_lo, r.nll_gain_hi, "+.4f"),
        ),
        *data("nll_gain_lo", "nll_gain_hi", "run_ids"),
    ),
)
ENSEMBLE_SIZE = Table(
    "ensemble_size",
    "Ensemble size (average of k members' probabilities)",
    (
        Col("members", "members", TEXT),
        Col("k", "k", "d"),
        Col("n_subsets", "subsets", "d"),
        Col("acc_mean", "test accuracy: mean [min, max]", _spread("acc", ".2f")),
        *data("acc_min", "acc_max"),
        Col("nll_mean", "NLL: mean [min, max]", _spread("nll", ".4f")),
        *data("nll_min", "nll_max", "run_id"),
    ),
)
UNFINISHED = Table(
    "unfinished",
    "Runs not finished",
    (
        Col("status", "status", TEXT),
        Col("role", "role", TEXT),
        Col("name", "run", lambda r: r.name or "-"),
        Col("since", "since", TEXT),
        Col("run_id", "run id", TEXT),
    ),
)
NOTES = Table("notes", None, (Col("note"),))  # markdown: a list under "Notes"

# In the order of the JSON document; markdown shows the runs not finished first.
SPECS = {
    t.name: t
    for t in (
        SEEDS,
        ENSEMBLES,
        KD,
        SELF_DISTILLATION,
        SD_ENSEMBLES,
        JOINT,
        SUMMARY,
        SWEEPS,
        GAINS,
        MECHANISM,
        FIGURE1,
        CALIBRATION,
        ENSEMBLE_SIZE,
        UNFINISHED,
        NOTES,
    )
}
TABLES = tuple(name for name in SPECS if name != "notes")
# The tables whose rows are runs, one each (ALONE too, in none of the rendered ones): their Runs.
OF_RUNS = {t.name: t.runs for t in (SEEDS, ENSEMBLES, KD, SELF_DISTILLATION, SD_ENSEMBLES, JOINT, ALONE) if t.runs}
RUNS = "runs"  # the per-run CSV table: every listed run once
RUN_COLUMNS = ["run_id", "table", "seeds", "val_acc", "test_acc"]
GROUP = ["group", "group_id", "preset", "dataset"]
CSV_TABLES = (RUNS, *SPECS)


def table_of(t, name: str) -> pd.DataFrame:
    """A table of one group's tables (``compare.StudyTables``), notes too."""
    return pd.DataFrame({"note": t.notes}, dtype=object) if name == "notes" else getattr(t, name)


# --- the runs the tables name -----------------------------------------------------


def logged(t) -> dict:
    """Run id -> its logged test accuracy, for every run a group's tables name (teachers
    too: their accuracy as the student's row shows it)."""
    out: dict = {}
    for name, runs in OF_RUNS.items():
        f = table_of(t, name)
        for column, acc in (("run_id", runs.test), *runs.also):
            if acc is not None:
                out |= dict(zip(f[column], f[acc], strict=True))
    return out


def run_ids(tables: list) -> list[str]:
    """Every run a list of group tables names, once: the runs each lists, their teachers
    and members (for fetching their predictions)."""
    ids: list = []
    for t in tables:
        for name, runs in OF_RUNS.items():
            f = table_of(t, name)
            for column in ("run_id", *(c for c, _acc in runs.also)):
                ids += [i for v in f[column].dropna() for i in (v if isinstance(v, list) else [v])]
    return list(dict.fromkeys(ids))


# --- the three renderers ----------------------------------------------------------


def markdown(tables: list) -> str:
    if not tables:
        return "no finished runs\n"
    parts = []
    for t in tables:
        parts.append(f"## {t.label} ({t.dataset})\n\ngroup `{t.group_id}`")
        parts += [f"### {title}\n\n{table}" for title, table in UNFINISHED.markdown(t.unfinished)]
        if not t.unfinished.empty and all(
            table_of(t, n).empty for n in ("seeds", "ensembles", "kd", "self_distillation", "joint")
        ):
            continue  # a table of runs not finished alone
        shown = [spec for spec in SPECS.values() if spec is not UNFINISHED]
        parts += [f"### {title}\n\n{table}" for spec in shown for title, table in spec.markdown(table_of(t, spec.name))]
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


def _head(t) -> dict:
    return {"group": t.label, "group_id": t.group_id, "preset": t.preset, "dataset": t.dataset}


def table_rows(tables: list) -> dict[str, list[dict]]:
    """Every table as row dicts tagged with the group and its recipe (the students'
    recipe on the rows of students); keys as in ``SPECS``."""
    out: dict[str, list[dict]] = {name: [] for name in SPECS}
    for t in tables:
        for name, spec in SPECS.items():
            head = {**_head(t), "recipe": t.student_recipe if spec.students and t.student_recipe else t.recipe}
            rows = table_of(t, name).to_dict("records")
            out[name] += [{**head, **{k: _native(v) for k, v in r.items()}} for r in rows]
    return out


def to_json(tables: list) -> str:
    return json.dumps(table_rows(tables), indent=2, allow_nan=False) + "\n"


def csv(tables: list, name: str = RUNS) -> str:
    """One table as CSV, one row per row of it in every group (``RUNS``: every listed run
    once, in the first table that lists it), the group's columns last; lists as "a;b"."""
    if name == RUNS:
        parts = [_runs(t, name, runs) for t in tables for name, runs in OF_RUNS.items() if name != "alone"]
        columns = [*RUN_COLUMNS, *GROUP]
    else:
        parts = [table_of(t, name).assign(**_head(t)) for t in tables]
        columns = [*SPECS[name].names, *GROUP]
    parts = [p[columns] for p in parts if len(p)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    if name == RUNS:
        out = out.drop_duplicates("run_id")
    lists = [c for c in out if out[c].map(lambda v: isinstance(v, list)).any()]
    joined = {c: out[c].map(lambda v: ";".join(v) if isinstance(v, list) else v) for c in lists}
    return out.assign(**joined).to_csv(index=False)


def _runs(t, name: str, runs: Runs) -> pd.DataFrame:
    f = table_of(t, name)
    cols = {"run_id": f["run_id"], "seeds": f[runs.seeds], "val_acc": f[runs.val], "test_acc": f[runs.test]}
    return pd.DataFrame({**cols, "table": name, **_head(t)}, index=f.index)


def check_table(fmt: str, name: str | None) -> None:
    """``compare --table``: the name of one of the CSV tables."""
    if name is None:
        return
    if fmt != "csv":
        raise ConfigError("table", name, "a table is chosen for --format csv only")
    if name not in CSV_TABLES:
        raise ConfigError("table", name, f"no such table; choose from {', '.join(CSV_TABLES)}")
