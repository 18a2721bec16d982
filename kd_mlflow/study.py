"""The whole study, planned as typed steps and recorded as one parent run.

Waves: the seeds; their ensemble; the KD students of the ensemble (one per KD seed) and
the SD students (teacher seed i -> student seed i + offset); the ensemble of the SD
students; with a KD student of another architecture, that architecture trained alone on
the teachers' seeds; with ``joint``, the seeds' networks trained as one averaged model; then the
tables, summary metrics and plots, logged on the parent. Each step knows its run name
and how to run in this process; serialised once (:meth:`Context.to_json`), it runs the
same in `kd-mlflow _step`, and an executor (:mod:`kd_mlflow.executors`) only chooses
where it runs. Every step goes through the same idempotent functions as the single
commands, so a rerun after an interruption does only what is missing and a rerun after
success trains nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

from . import executors, schema, steps, tracking, view
from .config import (
    PUBLISHED_WIDTH,
    STUDY_SEEDS,
    ConfigError,
    Recipe,
    check_model,
    check_schedule,
    cpu_precision,
    group_label,
    parse_seeds,
    resolve,
    study_student_model,
)
from .config import preset as preset_recipe
from .errors import Interrupted, TrackingRefused, TrackingUnavailable, cause, note_done
from .runs import Outcome, digest


class KDChooser(Protocol):
    """What chooses the KD student's settings before the KD step (a sweep on validation:
    :class:`kd_mlflow.sweep.KDSweep`); the study knows no more of it."""

    def label(self) -> str: ...

    def choose(self, plan: Plan, ctx: Context, ensemble: str, executor) -> tuple[tuple, str]:
        """(the chosen settings as (field, value) pairs, the choice in words)."""
        ...


@dataclass(frozen=True)
class Plan:
    preset: str
    recipe: Recipe
    overrides: dict
    seeds: list
    student_seed_offset: int = 10
    kd_seeds: tuple = (100,)  # one KD student per seed, all of the one ensemble
    data_dir: str | None = None
    student_model: str | None = None  # the KD student's architecture [the preset's, else its teachers']
    # The KD student's width [a --student-model's published one, else the teachers'];
    # None where it is the teachers' (the recipe's): the identity studies had before.
    student_width: int | None = None
    sweep_kd: KDChooser | None = None  # chooses the KD student's settings first (reproduce --sweep-kd)
    joint: bool = False  # add the joint model of the seeds (not the study's identity: a step more)

    def __post_init__(self):
        if self.student_model is not None and self.student_width is None:  # asked for: as published
            object.__setattr__(self, "student_width", PUBLISHED_WIDTH)
        if self.student_width == self.recipe.width:  # the teachers' width: nothing changes
            object.__setattr__(self, "student_width", None)
        if self.student_width is not None and (not isinstance(self.student_width, int) or self.student_width < 1):
            raise ConfigError("student_width", self.student_width, "must be an integer >= 1")
        if self.student_model is None:
            object.__setattr__(self, "student_model", study_student_model(self.preset))
        if self.student_model is not None:
            check_model(self.student_model)
        if self.student_seed_offset < 1:
            raise ConfigError("student_seed_offset", self.student_seed_offset, "must be >= 1")
        if len(self.seeds) < 2:
            raise ConfigError("seeds", ",".join(map(str, self.seeds)), "a study needs at least two seeds")
        if not self.kd_seeds or len(set(self.kd_seeds)) != len(self.kd_seeds):
            raise ConfigError("kd_seeds", ",".join(map(str, self.kd_seeds)), "expected distinct seeds")
        clash = set(self.seeds) & ({s + self.student_seed_offset for s in self.seeds} | set(self.kd_seeds))
        if clash:
            raise ConfigError(
                "student_seed_offset",
                self.student_seed_offset,
                f"student seeds would reuse teacher seeds {sorted(clash)}",
            )

    @property
    def label(self) -> str:
        """The preset and what this study's recipe changes of it: "smoke · epochs=3"; and
        a KD student's architecture other than the preset's: "· student_model=resnet8"."""
        label = group_label(self.preset, self.recipe, "student")
        if self.student_model != study_student_model(self.preset):
            label += f" · student_model={self.student_model}"
        if self.student_width is not None:
            label += f" · student_width={self.student_width}"
        if self.sweep_kd is not None:
            label += f" · sweep_kd={self.sweep_kd.label()}"
        return label

    @property
    def kd_seed(self) -> int:
        """The first KD seed: the student a --sweep-kd chooses at and the one registered
        (the student a one-seed study of these seeds had)."""
        return self.kd_seeds[0]

    @property
    def alone(self) -> bool:
        """Whether the KD student's network is not its teachers': then it is also trained
        alone on the teachers' seeds, so its KD gain can be told from its size."""
        return bool(self.student_overrides) and self.recipe.replace(**self.student_overrides) != self.recipe

    @property
    def student_overrides(self) -> dict:
        """What the KD student (and a --sweep-kd's students) trains with beyond the plan's
        overrides: its architecture and width, where they are not its teachers'."""
        model = {"model": self.student_model} if self.student_model else {}
        width = {"width": self.student_width} if self.student_width is not None else {}
        return {**model, **width}

    @property
    def own_recipe(self) -> bool:
        """Whether the study runs its preset's own recipe, unchanged but for the precision
        this CPU gives it (a CPU preset's auto is bf16 where the CPU has it natively)."""
        from .machine import native_bf16  # torch: not at import

        at_this_cpu = cpu_precision(self.preset, preset_recipe(self.preset), native_bf16())
        return self.label in {self.preset, group_label(self.preset, at_this_cpu, "student")}

    @property
    def n_steps(self) -> int:
        return self.n_trainings + 2  # and the two ensembles

    @property
    def n_trainings(self) -> int:
        return (2 + self.alone) * len(self.seeds) + len(self.kd_seeds) + self.joint


class StepPlan(Protocol):
    """What the steps read of a plan: a study's :class:`Plan`, a sweep's, or a step
    process's :class:`_Given`."""

    @property
    def preset(self) -> str: ...

    @property
    def overrides(self) -> dict: ...

    @property
    def data_dir(self) -> str | None: ...


@dataclass(frozen=True)
class Context:
    """What a step needs wherever it runs. The steps of a wave run here (:meth:`run`), or
    serialised (:meth:`to_json`) as `kd-mlflow _step` does, as a process or a Ray task:
    one entry, so a step runs the same wherever the executor puts it."""

    plan: StepPlan
    ex: steps.Execution
    parent: str | None  # the study's (sweep's) run
    session: object = None  # in-process steps only

    def where(self) -> dict:
        """The keyword arguments every in-process step passes to :mod:`kd_mlflow.steps`."""
        return {"data_dir": self.plan.data_dir, "ex": self.ex, "parent_run_id": self.parent, "session": self.session}

    def recipe(self) -> Recipe:
        """The training recipe: a study's (a sweep trains only students)."""
        recipe = getattr(self.plan, "recipe", None)
        assert isinstance(recipe, Recipe), "a train step outside a study"
        return recipe

    def run(self, items: list) -> list[Outcome]:
        """The steps, in this process: one, or a wave of one kind packed side by side."""
        return type(items[0]).run_packed(items, self) if len(items) > 1 else [items[0].run_here(self)]

    def to_json(self, items: list) -> str:
        """The steps and all they need, serialised once: what `kd-mlflow _step` reads."""
        p = self.plan
        return json.dumps(
            {
                "steps": [{"kind": type(s).__name__, **asdict(s)} for s in items],
                **{"preset": p.preset, "overrides": p.overrides, "data_dir": p.data_dir},
                **{"ex": asdict(self.ex), "parent": self.parent},
            },
            default=str,  # a Path
        )

    @staticmethod
    def from_json(text: str) -> tuple[list, Context]:
        """What :meth:`to_json` wrote: the steps, and their context in this process."""
        try:
            d = _tuples(json.loads(text))  # JSON has no tuples: every list was one
            items = [KINDS[s.pop("kind")](**s) for s in d["steps"]]
            ex = steps.Execution(**{**d["ex"], "cache_dir": d["ex"]["cache_dir"] and Path(d["ex"]["cache_dir"])})
            plan = _Given(d["preset"], d["overrides"], d["data_dir"], ex.device)
            return items, Context(plan, ex, d["parent"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError("step", text[:80], "not a step kd-mlflow serialised") from None


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Given:
    """A plan as a step process reads it: its recipe planned on this machine (a Ray
    node's), as the step's own command plans it."""

    preset: str
    overrides: dict
    data_dir: str | None
    device: str = "auto"

    @cached_property
    def recipe(self) -> Recipe:
        from .train import plan_run  # torch: not at import

        return plan_run(resolve(self.preset, **self.overrides), self.preset, self.device)


# --- the typed steps ---------------------------------------------------------


@dataclass(frozen=True)
class TrainStep:
    seed: int
    trains: bool = True
    network: tuple = ()  # (field, value) pairs over the study's recipe: the KD student's network, alone

    @property
    def name(self) -> str:
        return schema.train_name(self.seed) + schema.settings(dict(self.network))

    def recipe(self, ctx: Context) -> Recipe:
        return ctx.recipe().replace(**dict(self.network))

    def run_here(self, ctx: Context) -> Outcome:
        return steps.train(self.seed, self.recipe(ctx), ctx.plan.preset, **ctx.where())

    @staticmethod
    def run_packed(items: list[TrainStep], ctx: Context) -> list[Outcome]:
        recipe = items[0].recipe(ctx)  # a wave is of one network
        return steps.train_wave([s.seed for s in items], recipe, ctx.plan.preset, **ctx.where())


@dataclass(frozen=True)
class DistillStep:
    teacher: str  # run id
    seed: int
    method: str  # kd | sd
    teacher_seeds: str
    settings: tuple = ()  # (field, value) pairs over the plan's overrides (a sweep's grid point)
    suffix: str = ""  # what the settings change, as the run's name shows it
    trains: bool = True
    model: str | None = None  # the student's architecture, if not its teacher's
    width: int | None = None  # the student's width, if not its teacher's

    @property
    def name(self) -> str:
        return schema.student_name(self.method, self.seed, self.teacher_seeds, self.suffix)

    def overrides(self, ctx: Context) -> dict:
        model = {"model": self.model} if self.model else {}
        width = {"width": self.width} if self.width is not None else {}
        return {**ctx.plan.overrides, **model, **width, **dict(self.settings)}

    def run_here(self, ctx: Context) -> Outcome:
        return steps.distill(
            self.teacher, self.seed, preset=ctx.plan.preset, overrides=self.overrides(ctx), **ctx.where()
        )

    @staticmethod
    def run_packed(items: list[DistillStep], ctx: Context) -> list[Outcome]:
        students = [(s.teacher, s.seed, s.overrides(ctx)) for s in items]
        return steps.distill_wave(students, preset=ctx.plan.preset, **ctx.where())


@dataclass(frozen=True)
class EnsembleStep:
    members: tuple  # run ids
    seeds: tuple
    member_role: str
    combine: str = "prob"
    trains: bool = False

    @property
    def name(self) -> str:
        return schema.ensemble_name(self.seeds, self.member_role)

    def run_here(self, ctx: Context) -> Outcome:
        return steps.ensemble(list(self.members), combine=self.combine, **ctx.where())


@dataclass(frozen=True)
class JointStep:
    seeds: tuple
    trains: bool = True

    @property
    def name(self) -> str:
        return schema.joint_name(self.seeds)

    def run_here(self, ctx: Context) -> Outcome:
        return steps.joint(list(self.seeds), ctx.recipe(), ctx.plan.preset, **ctx.where())


KINDS = {kind.__name__: kind for kind in (TrainStep, DistillStep, EnsembleStep, JointStep)}


# --- progress ------------------------------------------------------------------


class Progress:
    """`[step 3/13] train-seed-2` with the elapsed time and an estimate of what is left,
    from the trainings that ran so far (ensembles take seconds)."""

    def __init__(self, total: int, trainings: int, log=sys.stderr):
        self.total, self.log = total, log
        self.trainings_left = trainings
        self.started = time.monotonic()
        self.count = 0
        self.trained_seconds: list[float] = []

    def starting(self, step) -> None:
        self.count += 1
        elapsed = time.monotonic() - self.started
        left = ""
        if self.trained_seconds:
            per = sum(self.trained_seconds) / len(self.trained_seconds)
            left = f", about {_clock(per * self.trainings_left)} left"
        print(
            f"[step {self.count}/{self.total}] {step.name}  ({_clock(elapsed)} elapsed{left})",
            file=self.log,
            flush=True,
        )

    def finished(self, step, outcome: Outcome, seconds: float) -> None:
        if step.trains:
            self.trainings_left -= 1
            if not outcome.reused:
                self.trained_seconds.append(seconds)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- the study ---------------------------------------------------------------


@dataclass
class StudyResult:
    parent_run_id: str
    runs: dict = field(default_factory=dict)  # step name -> run id
    trained: list = field(default_factory=list)  # step names that trained (not reused)
    tables: str = ""
    summary: dict = field(default_factory=dict)  # the parent run's metrics
    kd_choice: str = ""  # with --sweep-kd: the KD setting chosen on validation, and over what


DEFAULT_REGISTRY = "{experiment}-kd-student"


def reproduce(
    plan: Plan,
    *,
    experiment: str | None = None,
    ex: steps.Execution = steps.Execution(),
    executor=None,
    register_as: str | None = None,
) -> StudyResult:
    """Run the study with ``executor`` (default: in this process, one step at a time).
    ``register_as``: the registered model that gets the KD student (alias champion);
    "{experiment}" in it is the experiment's name."""
    # Fail on a bad device, bad data or a network that cannot be packed before any run exists.
    steps.check_device(ex)
    from .models import check_packable

    if isinstance(executor, executors.PackedWaves):
        check_packable(plan.recipe.model)
    if plan.joint:
        check_packable(plan.recipe.model, steps.JOINT_PACKS)
    _source, split = steps.load_data(plan.recipe, plan.data_dir, ex)
    check_schedule(plan.recipe, len(split.train_idx))
    session = tracking.connect(experiment)
    executor = executor or executors.InProcess()
    seeds = None if plan.seeds == parse_seeds(STUDY_SEEDS) else plan.seeds  # named where not the default
    name = schema.study_name(plan.preset, plan.recipe.dataset, plan.label, seeds)
    parent = tracking.open_study(session, name, _study_tags(plan, split.digest))
    if session.adopted_run_id and parent != session.adopted_run_id:
        print(
            f"note: this study already has a parent run, {parent}: the study continues there, and this run "
            f"only points at it ({tracking.run_link(session, parent)})",
            file=sys.stderr,
        )
    # Steps never adopt the run `mlflow run -e main` created: that one is the parent.
    ctx = Context(plan, ex, parent, session.without_adoption())
    result = StudyResult(parent)
    progress = Progress(plan.n_steps, plan.n_trainings)
    try:
        _waves(plan, ctx, executor, result, progress)
        if result.kd_choice:  # said by the study's parent, and by its KD students for compare
            for run_id in (parent, *_kd_runs(plan, result)):
                tracking.set_tags(session, run_id, {schema.SWEEP_KD_CHOICE: result.kd_choice})
        result.tables, result.summary = _report(session, parent, plan, result)
        if register_as:
            _register_kd_student(session, parent, plan, result, register_as)
    except BaseException as e:
        _end_parent(session, parent, e)
        raise
    finally:
        executor.close()
    tracking.set_terminated(session, parent, "FINISHED")
    _, start_ui = tracking.ui_base()
    print(
        f"study {tracking.run_link(session, parent)}\n"
        f"its runs side by side: {tracking.compare_link(session, result.runs.values())}\n"
        f"its runs by recipe and role, seeds aggregated: {view.link(session)}"
        + (f"\n(start the UI first: {start_ui})" if start_ui else ""),
        file=sys.stderr,
    )
    return result


def _end_parent(session, parent: str, e: BaseException) -> None:
    """The parent ends as a run does: KILLED on a signal only, FAILED with kd.failure on
    anything else. If the server is what failed, it cannot be told: the parent stays
    RUNNING and the same command continues the study."""
    try:
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            tracking.set_terminated(session, parent, "KILLED")
            note_done(e, f"study run {parent} marked KILLED; finished steps are kept: the same command continues")
        elif not isinstance(e, TrackingUnavailable):
            tracking.fail_run(session, parent, cause(e))
    except (TrackingUnavailable, TrackingRefused):
        pass


def _register_kd_student(session, parent: str, plan: Plan, result: StudyResult, name: str) -> None:
    """The KD student is the single model that carries the ensemble's gain: registered,
    with tags that point back at the study. Of several KD seeds, the first's: the seed
    the preset names, chosen before any result (never the best on test), and the student
    a --sweep-kd chose. The alias champion belongs to the preset's
    own recipe: a study of another recipe (``--epochs 3``) adds a version tagged with its
    recipe and leaves the alias where it is."""
    from . import runs

    name = name.replace("{experiment}", tracking.experiment_name(session))
    alias = "champion" if plan.own_recipe else None
    runs.register(
        session,
        _kd_runs(plan, result)[0],
        name,
        alias=alias,
        tags={
            schema.STUDY_RUN_ID: parent,
            schema.PRESET: plan.preset,
            schema.DATASET: plan.recipe.dataset,
            schema.EXPERIMENT_ID: session.experiment_id,
            schema.GROUP_LABEL: plan.label,
        },
    )
    if alias is None:
        print(
            f"note: the alias champion stays on {plan.preset}'s own recipe; this study's recipe is "
            f"'{plan.label}' (the version's tag {schema.GROUP_LABEL})",
            file=sys.stderr,
        )


def _kd_runs(plan: Plan, result: StudyResult) -> list[str]:
    """The KD students' run ids, in the order of ``plan.kd_seeds``."""
    of = ",".join(map(str, plan.seeds))
    return [result.runs[schema.student_name("kd", k, of)] for k in plan.kd_seeds]


def _waves(plan: Plan, ctx: Context, executor, result: StudyResult, progress: Progress) -> None:
    seeds, off = plan.seeds, plan.student_seed_offset

    def wave(items):
        outcomes = executor.run_wave(items, ctx, progress)
        for step, out in zip(items, outcomes, strict=True):
            result.runs[step.name] = out.run_id
            if not out.reused:
                result.trained.append(step.name)
        return [o.run_id for o in outcomes]

    teachers = wave([TrainStep(s) for s in seeds])
    ens = wave([EnsembleStep(tuple(teachers), tuple(seeds), "train")])[0]
    best: tuple = ()
    if plan.sweep_kd is not None:  # the KD row is then the chosen sweep student, reused
        best, result.kd_choice = plan.sweep_kd.choose(plan, ctx, ens, executor)
    of = ",".join(map(str, seeds))
    kd = [
        DistillStep(ens, k, "kd", of, best, model=plan.student_model, width=plan.student_width) for k in plan.kd_seeds
    ]
    wave(kd)
    sd = wave([DistillStep(t, s + off, "sd", str(s)) for t, s in zip(teachers, seeds, strict=True)])
    wave([EnsembleStep(tuple(sd), tuple(s + off for s in seeds), "student")])
    if plan.alone:  # the KD student's network without KD: what distillation did, apart from its size
        wave([TrainStep(s, network=tuple(plan.student_overrides.items())) for s in seeds])
    if plan.joint:
        wave([JointStep(tuple(seeds))])


# --- the parent run --------------------------------------------------------


def _study_tags(plan: Plan, split_digest: str) -> dict:
    # --pack is not part of a study's identity: packed and lone runs of a configuration
    # are the same runs.
    return {
        schema.STUDY: "true",
        schema.PRESET: plan.preset,
        schema.GROUP_LABEL: plan.label,
        schema.DATASET: plan.recipe.dataset,
        schema.SPLIT_DIGEST: split_digest,
        schema.CONFIG_HASH: digest(
            "study",
            plan.recipe.digest("student"),
            split_digest,
            plan.seeds,
            plan.student_seed_offset,
            # one seed as the int studies hashed before: they are found and reused
            plan.kd_seeds[0] if len(plan.kd_seeds) == 1 else list(plan.kd_seeds),
            *([plan.student_model] if plan.student_model else []),  # none: the hash studies had before
            *([f"student_width={plan.student_width}"] if plan.student_width is not None else []),
            *([f"sweep_kd={plan.sweep_kd.label()}"] if plan.sweep_kd else []),
        ),
    }


# Summary rows -> the parent run's metrics, so MLflow lists the study as a training
# run and its run comparison puts two studies side by side.
SUMMARY_METRICS = {
    ("single models", "test_mean"): "single_test_acc_mean",
    ("single models", "test_std"): "single_test_acc_std",
    ("ensemble", "test_mean"): "ensemble_test_acc",
    ("ensemble", "gain"): "ensemble_gain",
    ("KD students", "test_mean"): "kd_test_acc",
    ("KD students", "gain"): "kd_gain",
    ("SD students", "test_mean"): "sd_test_acc_mean",
    ("SD students", "gain"): "sd_gain_mean",
    ("SD ensemble", "test_mean"): "sd_ensemble_test_acc",
    ("SD ensemble", "gain"): "sd_ensemble_gain",
    ("student's network alone", "test_mean"): "alone_test_acc",
    ("student's network alone", "gain"): "alone_gain",
}


# Bounds of the paired-bootstrap interval of each gain, as parent metrics too.
GAIN_METRICS = {
    "ensemble - mean single": "ensemble_gain",
    "KD - mean single": "kd_gain",
    "KD - mean single (mean over KD seeds)": "kd_gain",  # several KD students: their mean's interval
    "SD - teacher (mean over pairs)": "sd_gain_mean",
    "SD ensemble - ensemble": "sd_ensemble_gain",
    "KD - student's network alone": "kd_over_alone_gain",  # its estimate too: no summary row has it
}


# Calibration rows -> the parent's NLL metrics.
NLL_METRICS = {"single models (mean)": "single_nll_mean", "ensemble": "ensemble_nll", "KD students": "kd_nll"}


def _measure_metrics(t) -> dict:
    """The parent's NLL metrics, and the joint run's accuracy and gain where there is one."""
    out = {NLL_METRICS[r.row]: float(r.nll) for r in t.calibration.itertuples() if r.row in NLL_METRICS}
    joint = t.figure1[(t.figure1["column"] == "joint") & (t.figure1["n"] > 0)]
    for r in joint.itertuples():
        out.update(joint_test_acc=float(r.test_acc), joint_gain=float(r.gain))
    return {k: v for k, v in out.items() if v == v}  # not NaN


def _report(session, parent: str, plan: Plan, result: StudyResult) -> tuple[str, dict]:
    from . import compare, measures, plots, report, runs

    frame = runs.results_frame(session)
    frame = frame[frame["run_id"].isin(set(result.runs.values()))]  # exactly this study's steps
    preds = report.predictions_for(session, result.runs.values())
    tables = compare.build_tables(frame, predictions=preds)
    text = compare.render(tables, "markdown")
    summary = {}
    # A KD student of another architecture has a table of its own (compare never mixes
    # architectures): each figure comes from the first table that has it.
    for t in reversed(tables):
        rows = t.summary.set_index("row")
        for (row, col), key in SUMMARY_METRICS.items():
            value = rows.loc[row, col] if row in rows.index and rows.loc[row, "n"] else float("nan")
            if value == value:  # not NaN
                summary[key] = float(value)
        for g in t.gains.itertuples():
            metric = GAIN_METRICS.get(g.gain)
            if metric == "kd_over_alone_gain":
                summary[metric] = float(g.estimate)
            if metric and g.lo == g.lo:
                summary.update({f"{metric}_lo": float(g.lo), f"{metric}_hi": float(g.hi)})
        summary.update(_measure_metrics(t))
    # The parent's figures are of this study's own runs; compare's group may hold more
    # (another study's KD student): the tag says which runs these are.
    covered = sorted({rid for t in tables for ids in t.summary["run_ids"] for rid in ids})
    tracking.set_tags(session, parent, {schema.SUMMARY_RUN_IDS: ",".join(covered)})
    roles = {  # solid lines: networks trained from their initialisation (a joint model too)
        name: ("teacher" if name.startswith(("train-", "joint-")) else "student")
        for name in result.runs
        if not name.startswith(("ensemble-", "sd-ensemble-"))
    }
    histories = runs.metric_histories(session, {n: result.runs[n] for n in roles})
    figs = plots.figures(histories, roles, tables)
    if tables and not tables[0].gains.empty:
        figs["gains.png"] = plots.gains(tables[0].gains)
    if tables:
        figs.update(plots.measures(tables[0], measures.reliability(tables[0], preds)))
    tracking.log_study(
        session,
        parent,
        {"tables.md": text, "tables.json": compare.render(tables, "json"), "tables.csv": compare.render(tables, "csv")},
        {"steps": result.runs, "trained": result.trained},
        figs,
        summary,
    )
    plots.close(figs)
    return text, summary
