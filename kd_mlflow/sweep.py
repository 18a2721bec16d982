"""Distillation settings searched as one parent run, chosen on validation only.

A sweep is a grid of students of one teacher (every combination of the fields given as
comma lists, times the seeds), recorded as runs nested under one sweep parent. Each
student is an ordinary `distill` run: a grid point that already has a result is reused,
so a rerun trains nothing and a wider grid trains only its new points.

The honest protocol is the only one: each setting's mean validation accuracy over its
seeds chooses the best (ties: the smaller temperature, then the smaller alpha, then the
smaller value of the other fields in the order given), and only the chosen setting's
test accuracy is reported as the result. The pure part (:func:`parse_grid`,
:func:`select`, :func:`render`, :func:`rounded`) has no MLflow and no torch.

A search (``--search optuna --trials N``) asks Optuna's TPE sampler, seeded, for N
settings over ranges (``--temperature 1:8``, ``--alpha 0:1``, ``lo:hi:log``) and comma
lists (categorical). The study is Optuna's in-memory one and a trial is a setting: its
students are the same nested runs, trained (or reused) by the same code, as a grid
point's; Optuna is told the setting's mean validation accuracy, never its test
accuracy. MLflow 3.17's ``mlflow.optuna.MlflowStorage`` is not used: it creates a run of
its own for every trial (besides the students it would stand for, one per seed) and a
new one on every rerun, so a rerun would not be the same runs. A continuous value is
rounded to :data:`SIGNIFICANT` significant digits before it becomes a recipe field
(a trial of 2.3417 trains temperature=2.34): nearby suggestions are then the same run,
and the same search, rerun, is told the same numbers, so the seeded sampler asks the
same settings and every student is reused.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field, fields, replace

import pandas as pd

from .compare import chosen, select
from .config import ConfigError, Recipe, field_value
from .errors import MissingExtra

SIGNIFICANT = 3  # digits a searched float keeps (differences below it are below seed noise)


@dataclass(frozen=True)
class Range:
    """A searched interval of one numeric recipe field (``lo:hi``, ``lo:hi:log``)."""

    lo: float
    hi: float
    log: bool = False

    def __str__(self) -> str:
        return f"{_short(self.lo)}:{_short(self.hi)}" + (":log" if self.log else "")


def rounded(value: float, lo: float, hi: float) -> float:
    """A suggested float as the recipe value it trains: SIGNIFICANT significant digits,
    kept inside [lo, hi]."""
    return min(max(float(f"{value:.{SIGNIFICANT}g}"), lo), hi)


@dataclass(frozen=True)
class Grid:
    """(field, values) pairs, in the order given; every combination is a setting."""

    axes: tuple[tuple[str, tuple | Range], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.axes]

    def settings(self) -> list[tuple[tuple[str, object], ...]]:
        lists = [vals for _, vals in self.axes if isinstance(vals, tuple)]
        assert len(lists) == len(self.axes), "a range is searched, not enumerated"
        return [tuple(zip(self.names, combo, strict=True)) for combo in itertools.product(*lists)]

    def label(self) -> str:
        """temperature=1,2,4-alpha=0.5,1 (run names); a range: temperature=1:8."""
        return "-".join(f"{name}={_values(vals)}" for name, vals in self.axes)


def _values(vals: tuple | Range) -> str:
    return str(vals) if isinstance(vals, Range) else ",".join(_short(v) for v in vals)


def _short(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def parse_grid(lists: dict[str, str], ranges: bool = False) -> Grid:
    """Recipe fields given as comma lists ("1,2,4") -> a Grid of typed, checked values;
    with ``ranges`` (a search), a numeric field may be an interval "lo:hi" or
    "lo:hi:log". A bad value is refused with one line naming it, before anything is
    loaded."""
    kinds = {f.name: getattr(Recipe, f.name) for f in fields(Recipe)}
    axes: list[tuple[str, tuple | Range]] = []
    for name, text in lists.items():
        if name not in kinds or isinstance(kinds[name], tuple):
            raise ConfigError(name, text, "not a recipe field that can be swept")
        if ":" in str(text):
            axes.append((name, _range(name, str(text), kinds[name], ranges)))
            continue
        values = tuple(_typed(name, part.strip()) for part in str(text).split(","))
        if len(set(values)) != len(values):
            raise ConfigError(name, text, "a value is given twice")
        axes.append((name, values))
    if not axes:
        raise ConfigError("grid", "", "give at least one recipe field as a comma list, e.g. --temperature 1,2,4")
    return Grid(tuple(axes))


def _range(name: str, text: str, default, allowed: bool) -> Range:
    if not allowed:
        raise ConfigError(name, text, "a range lo:hi is searched (kd-mlflow sweep --search optuna); give a list")
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise ConfigError(name, text, "a range needs a numeric field; give a comma list")
    parts = [part.strip() for part in text.split(":")]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise ConfigError(name, text, "not lo:hi or lo:hi:log")
    lo, hi = _typed(name, parts[0]), _typed(name, parts[1])
    if not lo < hi:
        raise ConfigError(name, text, "lo must be below hi")
    if len(parts) == 3 and lo <= 0:
        raise ConfigError(name, text, "a log range needs lo > 0")
    return Range(lo, hi, len(parts) == 3)


def _typed(name: str, text: str):
    value = field_value(name, text)  # the one reading of a recipe field's text
    Recipe().replace(**{name: value})  # the recipe's own checks: ranges and choices
    return value


# --- selection -----------------------------------------------------------------


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
class Search:
    """Optuna's TPE sampler, seeded with ``seed``, asked for ``trials`` settings."""

    trials: int
    seed: int = 0


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep's steps need (the study's Context reads the same attributes)."""

    teacher: str  # run id
    seeds: list
    grid: Grid
    preset: str = ""  # the teacher's, filled in when the teacher is read
    overrides: dict = field(default_factory=dict)  # fields fixed for every point
    data_dir: str | None = None
    search: Search | None = None  # None: every setting of the grid


@dataclass(frozen=True)
class SweepResult:
    text: str  # the table and the choice
    parent: str  # the sweep's run id
    best: tuple  # the chosen setting: (field, value) pairs
    n_settings: int

    @property
    def choice(self) -> str:
        """temperature=2, alpha=1 chosen on validation over 6 settings."""
        setting = ", ".join(f"{n}={_short(v)}" for n, v in self.best)
        return f"{setting} chosen on validation over {self.n_settings} settings"


def run(plan: SweepPlan, *, experiment=None, ex=None, executor=None, show_test: bool = False):
    """Train (or reuse) every grid point's students under one sweep parent, choose on
    validation, and record the choice on the parent. Returns (text, parent run id)."""
    from . import executors, steps, tracking

    session = tracking.connect(experiment)
    executor = executor or executors.InProcess()
    try:
        result = within(session, plan, ex or steps.Execution(), executor, show_test=show_test)
    finally:
        executor.close()
    return result.text, result.parent


def within(session, plan: SweepPlan, ex, executor, *, nested_in=None, show_test: bool = False) -> SweepResult:
    """The sweep, with a session and an executor that its caller opened and closes (a
    study's, for ``reproduce --sweep-kd``); ``nested_in``: the run its parent is nested
    under."""
    from . import runs, schema, steps, study, tracking
    from .runs import digest

    optuna = optuna_module() if plan.search else None  # refused before any run exists
    teacher = runs.finished(session, plan.teacher, "teacher")
    plan = replace(plan, preset=teacher.preset or "custom")
    method = "kd" if teacher.role == "ensemble" else "sd"
    t_seeds = ",".join(teacher.member_seeds) or (str(teacher.seed) if teacher.seed is not None else "")
    search = [plan.search.trials, plan.search.seed] if plan.search else []  # none: a grid's hash as before
    tags = {
        schema.SWEEP: "true",
        schema.SEARCH: "optuna" if plan.search else "grid",
        schema.PRESET: plan.preset,
        schema.DATASET: teacher.dataset or "",
        schema.TEACHER_RUN_ID: plan.teacher,
        schema.CONFIG_HASH: digest(
            "sweep", plan.teacher, plan.grid.axes, plan.seeds, sorted(plan.overrides.items()), *search
        ),
    }
    name = f"sweep-{method}-{teacher.name}-{plan.grid.label()}"
    name += f"-optuna-{plan.search.trials}-seed-{plan.search.seed}" if plan.search else ""
    parent = tracking.open_study(session, name, tags, nested_in=nested_in)
    ctx = study.Context(plan, ex, parent, session.without_adoption())
    n = (plan.search.trials if plan.search else len(plan.grid.settings())) * len(plan.seeds)
    progress = study.Progress(n, n)

    def train(settings) -> list[dict]:
        """The settings' students, as one wave; one row per student."""
        items = []
        for setting in settings:
            changed = steps.student_changes(plan.preset, teacher, {**plan.overrides, **dict(setting)}, ex.device)
            suffix = schema.settings(changed)
            items += [study.DistillStep(plan.teacher, s, method, t_seeds, setting, suffix=suffix) for s in plan.seeds]
        outcomes = executor.run_wave(items, ctx, progress)
        return [_row(session, step, out.run_id) for step, out in zip(items, outcomes, strict=True)]

    try:
        rows = _searched(optuna, plan, train) if optuna else train(plan.grid.settings())
        result = _record_choice(session, parent, plan, rows, show_test)
    except BaseException as e:
        tracking.fail_run(session, parent, str(e) or type(e).__name__)
        raise
    tracking.set_terminated(session, parent, "FINISHED")
    print(
        f"sweep {tracking.run_link(session, parent)}\n"
        f"its students side by side: {tracking.compare_link(session, [r['run_id'] for r in rows])}",
        file=sys.stderr,
    )
    return result


def _row(session, step, run_id: str) -> dict:
    from . import runs

    rec = runs.get(session, run_id, "run")
    return {
        **dict(step.settings),
        "seed": step.seed,
        "val_acc": rec.final_val_acc,
        "test_acc": rec.final_test_acc,
        "run_id": run_id,
    }


@dataclass(frozen=True)
class KDSweep:
    """``reproduce --sweep-kd``: the study's KD student (its ensemble as teacher, its KD
    seed, architecture and recipe) swept over ``grid`` before the KD step, as a sweep
    whose parent is nested under the study's parent: the study's steps stay one list in
    MLflow's UI, with the sweep one expandable row among them that holds its own table,
    choice and heat map (its students directly under the study would mix six KD students
    into the thirteen steps, with no row to hold the choice). The executor is the
    study's (--jobs, --pack)."""

    grid: Grid

    def label(self) -> str:
        return self.grid.label()

    def choose(self, plan, ctx, ensemble: str, executor) -> tuple[tuple, str]:
        swept = SweepPlan(
            ensemble,
            [plan.kd_seed],
            self.grid,
            overrides={**plan.overrides, **plan.student_overrides},
            data_dir=plan.data_dir,
        )
        result = within(ctx.session, swept, ctx.ex, executor, nested_in=ctx.parent)
        return result.best, f"{result.choice} (sweep run {result.parent})"


# --- Optuna --------------------------------------------------------------------


def optuna_module():
    """Optuna, an optional extra; without it one line says how to install it (exit 1:
    the request is valid, the machine lacks a package: the environment, as errors.py
    rules)."""
    try:
        import optuna
    except ImportError:
        raise MissingExtra("optuna", "--search optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials are reported as runs
    return optuna


def _searched(optuna, plan: SweepPlan, train) -> list[dict]:
    """Optuna asks, the students answer: a new setting is trained (or reused) as a grid
    point is, and Optuna is told its mean validation accuracy; a setting asked again
    (rounding makes nearby suggestions one) is told the same number without a run."""
    assert plan.search is not None
    sampler = optuna.samplers.TPESampler(seed=plan.search.seed)
    searching = optuna.create_study(direction="maximize", sampler=sampler)
    rows: list[dict] = []
    told: dict[tuple, float] = {}
    for _ in range(plan.search.trials):
        trial = searching.ask()
        setting = tuple((name, _suggest(trial, name, axis)) for name, axis in plan.grid.axes)
        if setting not in told:
            new = train([setting])
            rows += new
            told[setting] = sum(r["val_acc"] for r in new) / len(new)
        searching.tell(trial, told[setting])
    return rows


def _suggest(trial, name: str, axis: tuple | Range):
    if isinstance(axis, tuple):
        return trial.suggest_categorical(name, list(axis))
    if isinstance(axis.lo, int) and isinstance(axis.hi, int):  # an int field (epochs)
        return trial.suggest_int(name, axis.lo, axis.hi, log=axis.log)
    return rounded(trial.suggest_float(name, axis.lo, axis.hi, log=axis.log), axis.lo, axis.hi)


# --- the choice, recorded on the parent ---------------------------------------------


def _record_choice(session, parent: str, plan: SweepPlan, rows: list[dict], show_test: bool) -> SweepResult:
    from . import plots, stats, tracking

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
    search = {"trials": plan.search.trials, "search_seed": plan.search.seed} if plan.search else {}
    tracking.log_params(session, parent, {**{f"best_{n}": _short(best[n]) for n in names}, **search})
    tracking.log_study(
        session, parent, {"sweep.md": text, "sweep.json": as_json(table, names, show_test)}, {}, figs, metrics
    )
    plots.close(figs)
    return SweepResult(text, parent, tuple((n, _native(best[n])) for n in names), len(table))


def _native(value):
    """A pandas cell as the recipe value it came from (numpy scalars are not)."""
    return value.item() if hasattr(value, "item") else value
