"""Distillation settings searched as one parent run, chosen on validation only.

A sweep is a grid of students of one teacher (every combination of the fields given as
comma lists, times the seeds), recorded as runs nested under one sweep parent. Each
student is an ordinary `distill` run: a grid point that already has a result is reused,
so a rerun trains nothing and a wider grid trains only its new points.

The honest protocol is the only one: each setting's mean validation accuracy over its
seeds chooses the best (ties: the smaller temperature, then the smaller alpha, then the
smaller value of the other fields in the order given), and only the chosen setting's
test accuracy is reported as the result. The pure part (:func:`parse_grid`,
:func:`select`, :func:`render`) has no MLflow and no torch.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field, fields

import pandas as pd

from .config import ConfigError, Recipe, field_value

TIE_ORDER = ("temperature", "alpha")  # smaller first, on equal validation means


@dataclass(frozen=True)
class Grid:
    """(field, values) pairs, in the order given; every combination is a setting."""

    axes: tuple[tuple[str, tuple], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.axes]

    def settings(self) -> list[tuple[tuple[str, object], ...]]:
        values = itertools.product(*(vals for _, vals in self.axes))
        return [tuple(zip(self.names, combo, strict=True)) for combo in values]

    def label(self) -> str:
        """temperature=1,2,4-alpha=0.5,1 (run names)."""
        return "-".join(f"{name}={','.join(_short(v) for v in vals)}" for name, vals in self.axes)


def _short(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def parse_grid(lists: dict[str, str]) -> Grid:
    """Recipe fields given as comma lists ("1,2,4") -> a Grid of typed, checked values.
    A bad value is refused with one line naming it, before anything is loaded."""
    kinds = {f.name: getattr(Recipe, f.name) for f in fields(Recipe)}
    axes = []
    for name, text in lists.items():
        if name not in kinds or isinstance(kinds[name], tuple):
            raise ConfigError(name, text, "not a recipe field that can be swept")
        values = tuple(_typed(name, part.strip()) for part in str(text).split(","))
        if len(set(values)) != len(values):
            raise ConfigError(name, text, "a value is given twice")
        axes.append((name, values))
    if not axes:
        raise ConfigError("grid", "", "give at least one recipe field as a comma list, e.g. --temperature 1,2,4")
    return Grid(tuple(axes))


def _typed(name: str, text: str):
    value = field_value(name, text)  # the one reading of a recipe field's text
    Recipe().replace(**{name: value})  # the recipe's own checks: ranges and choices
    return value


# --- selection -----------------------------------------------------------------


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


def render(table: pd.DataFrame, names: list[str], show_test: bool, interval: tuple | None = None) -> str:
    """The settings as a markdown table; the test column holds the chosen setting's
    accuracy only, unless ``show_test`` (then every setting's, for inspection)."""
    header = [*names, "n", "validation (mean ± std)", "test (mean ± std)", ""]
    lines = [header, ["---"] * len(header)]
    for r in table.itertuples():
        test = _pm(r.test_mean, r.test_std) if (r.chosen or show_test) else "·"
        lines.append(
            [
                *(_short(getattr(r, n)) for n in names),
                str(r.n),
                _pm(r.val_mean, r.val_std),
                test,
                "chosen" if r.chosen else "",
            ]
        )
    best = chosen(table)
    setting = ", ".join(f"{n}={_short(best[n])}" for n in names)
    text = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    result = f"{best.test_mean:.2f}"
    if interval is not None:
        result += f" [{interval[0]:.2f}, {interval[1]:.2f}] (95% t over {int(best.n)} seeds)"
    return (
        f"{text}\n\nchosen on validation: {setting} (validation {best.val_mean:.2f} over {int(best.n)} seed(s)); "
        f"its test accuracy: {result}\n"
    )


def _pm(mean, std) -> str:
    return f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}")


def as_json(table: pd.DataFrame, names: list[str], show_test: bool) -> str:
    rows = []
    for r in table.to_dict("records"):
        if not (r["chosen"] or show_test):
            r["test_mean"] = r["test_std"] = None
        rows.append({k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()})
    return json.dumps({"fields": names, "settings": rows}, indent=2, default=str) + "\n"


# --- the sweep as runs ------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep's steps need (the study's Context reads the same attributes)."""

    teacher: str  # run id
    seeds: list
    grid: Grid
    preset: str = ""  # the teacher's, filled in when the teacher is read
    overrides: dict = field(default_factory=dict)  # fields fixed for every point
    data_dir: str | None = None


def run(plan: SweepPlan, *, experiment=None, ex=None, executor=None, show_test: bool = False):
    """Train (or reuse) every grid point's students under one sweep parent, choose on
    validation, and record the choice on the parent. Returns (text, parent run id)."""
    from . import executors, runs, schema, steps, study, tracking
    from .runs import digest

    ex = ex or steps.Execution()
    session = tracking.connect(experiment)
    teacher = runs.finished(session, plan.teacher, "teacher")
    plan = SweepPlan(plan.teacher, plan.seeds, plan.grid, teacher.preset or "custom", plan.overrides, plan.data_dir)
    method = "kd" if teacher.role == "ensemble" else "sd"
    t_seeds = ",".join(teacher.member_seeds) or (str(teacher.seed) if teacher.seed is not None else "")
    items = []
    for setting in plan.grid.settings():
        changed = steps.student_changes(plan.preset, teacher, {**plan.overrides, **dict(setting)})
        for seed in plan.seeds:
            items.append(
                study.DistillStep(plan.teacher, seed, method, t_seeds, setting, suffix=schema.settings(changed))
            )
    tags = {
        schema.SWEEP: "true",
        schema.PRESET: plan.preset,
        schema.DATASET: teacher.dataset or "",
        schema.TEACHER_RUN_ID: plan.teacher,
        schema.CONFIG_HASH: digest("sweep", plan.teacher, plan.grid.axes, plan.seeds, sorted(plan.overrides.items())),
    }
    name = f"sweep-{method}-{teacher.name}-{plan.grid.label()}"
    parent = tracking.open_study(session, name, tags)
    ctx = study.Context(plan, ex, parent, session.without_adoption())
    executor = executor or executors.InProcess()
    try:
        outcomes = executor.run_wave(items, ctx, study.Progress(len(items), len(items)))
        text = _record_choice(session, parent, plan, items, outcomes, show_test)
    except BaseException as e:
        tracking.fail_run(session, parent, str(e) or type(e).__name__)
        raise
    finally:
        executor.close()
    tracking.set_terminated(session, parent, "FINISHED")
    print(
        f"sweep {tracking.run_link(session, parent)}\n"
        f"its students side by side: {tracking.compare_link(session, [o.run_id for o in outcomes])}",
        file=sys.stderr,
    )
    return text, parent


def _record_choice(session, parent: str, plan: SweepPlan, items, outcomes, show_test: bool) -> str:
    from . import plots, runs, stats, tracking

    rows = []
    for step, out in zip(items, outcomes, strict=True):
        rec = runs.get(session, out.run_id, "run")
        rows.append(
            {
                **dict(step.settings),
                "seed": step.seed,
                "val_acc": rec.final_val_acc,
                "test_acc": rec.final_test_acc,
                "run_id": out.run_id,
            }
        )
    names = plan.grid.names
    table = select(pd.DataFrame(rows), names)
    best = chosen(table)
    seeds = pd.DataFrame(rows).set_index("run_id").loc[best.run_ids, "test_acc"]
    interval = stats.seed_interval(list(seeds)) if len(seeds) >= 2 else None
    span = (interval.lo, interval.hi) if interval else None
    metrics = {"best_val_acc_mean": best.val_mean, "best_test_acc_mean": best.test_mean, "n_settings": len(table)}
    if span:
        metrics.update(best_test_acc_lo=span[0], best_test_acc_hi=span[1])
    text = render(table, names, show_test, span)
    figs = {"sweep.png": plots.sweep(table, names)}
    tracking.log_params(session, parent, {f"best_{n}": _short(best[n]) for n in names})
    tracking.log_study(
        session, parent, {"sweep.md": text, "sweep.json": as_json(table, names, show_test)}, {}, figs, metrics
    )
    plots.close(figs)
    return text
