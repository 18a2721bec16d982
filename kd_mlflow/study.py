"""The whole study as one parent run with the steps nested under it.

Waves: the seeds; their ensemble; the KD student of the ensemble and the SD students
(teacher seed i -> student seed i + offset); the ensemble of the SD students; then the
tables and plots, logged on the parent. Every step goes through the same idempotent
functions as the single commands, so a rerun after an interruption does only what is
missing and a rerun after success trains nothing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import schema, steps, tracking
from .config import ConfigError, Recipe
from .errors import TrackingUnavailable


@dataclass(frozen=True)
class Plan:
    preset: str
    recipe: Recipe
    overrides: dict
    seeds: list
    student_seed_offset: int = 10
    kd_seed: int = 100
    data_dir: str | None = None

    def __post_init__(self):
        if self.student_seed_offset < 1:
            raise ConfigError("student_seed_offset", self.student_seed_offset, "must be >= 1")
        if len(self.seeds) < 2:
            raise ConfigError("seeds", ",".join(map(str, self.seeds)), "a study needs at least two seeds")
        clash = set(self.seeds) & ({s + self.student_seed_offset for s in self.seeds} | {self.kd_seed})
        if clash:
            raise ConfigError("student_seed_offset", self.student_seed_offset,
                              f"student seeds would reuse teacher seeds {sorted(clash)}")


@dataclass
class StudyResult:
    parent_run_id: str
    runs: dict = field(default_factory=dict)   # step name -> run id
    trained: list = field(default_factory=list)  # step names that trained (not reused)
    tables: str = ""


class StepFailed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(f"step {step} failed: {reason}")
        self.step = step


def reproduce(plan: Plan, experiment: str | None = None, ex: steps.Execution = steps.Execution(),
              jobs: int = 1, executor=None) -> StudyResult:
    if jobs < 1:
        raise ConfigError("jobs", jobs, "must be >= 1")
    # Fail on bad data before any run exists.
    source, split = steps._load(plan.recipe, plan.data_dir, ex)
    session = tracking.connect(experiment)
    # Steps never adopt the run `mlflow run -e main` created: that one is the parent.
    step_session = dataclasses.replace(session, adopted_run_id=None)
    if executor is None or executor == "local":
        run = _InProcess(step_session, ex) if jobs == 1 else _Subprocesses(step_session, ex, jobs)
    else:
        run = executor(step_session, ex)  # e.g. ray_executor(...)
    parent = tracking.open_study(session, _study_name(plan), _study_tags(plan, split.digest))
    run.plan, run.parent = plan, parent
    result = StudyResult(parent)
    try:
        _waves(plan, run, result, split.digest)
        result.tables = _report(session, parent, plan, result)
    except (StepFailed, TrackingUnavailable) as e:
        tracking.set_terminated(session, parent, "FAILED")
        if isinstance(e, StepFailed):
            tracking.note(session, parent, str(e))
        raise
    except BaseException:
        tracking.set_terminated(session, parent, "KILLED")
        raise
    finally:
        getattr(run, "close", lambda: None)()
    tracking.set_terminated(session, parent, "FINISHED")
    return result


def ray_executor(address: str | None = None, gpus_per_run: float | None = None,
                 local_gpus: int | None = None):
    """An executor factory for :func:`reproduce`."""
    return lambda session, ex: _Ray(session, ex, address, gpus_per_run, local_gpus)


def _waves(plan: Plan, run, result: StudyResult, digest: str) -> None:
    seeds, off = plan.seeds, plan.student_seed_offset
    trained = run.wave([("train", f"train-seed-{s}", dict(seed=s)) for s in seeds], result)
    ens = run.wave([("ensemble", "ensemble", dict(members=[trained[f"train-seed-{s}"] for s in seeds]))],
                   result)["ensemble"]
    students = [("distill", f"kd-seed-{plan.kd_seed}", dict(teacher=ens, seed=plan.kd_seed))]
    students += [("distill", f"sd-t{s}-s{s + off}", dict(teacher=trained[f"train-seed-{s}"], seed=s + off))
                 for s in seeds]
    done = run.wave(students, result)
    run.wave([("ensemble", "sd-ensemble",
               dict(members=[done[f"sd-t{s}-s{s + off}"] for s in seeds]))], result)


class _Executor:
    """Runs one wave of independent steps; subclasses say how (``run_all``)."""
    parent: str = ""

    def __init__(self, session, ex: steps.Execution):
        self.session, self.ex = session, ex
        self.plan: Plan | None = None

    def wave(self, items, result: StudyResult) -> dict:
        outcomes = self.run_all(items)
        for (_, name, _), out in zip(items, outcomes):
            result.runs[name] = out.run_id
            if not out.reused:
                result.trained.append(name)
        return {name: out.run_id for (_, name, _), out in zip(items, outcomes)}


class _InProcess(_Executor):
    def run_all(self, items):
        return [self._one(kind, name, kw) for kind, name, kw in items]

    def _one(self, kind, name, kw):
        p = self.plan
        try:
            if kind == "train":
                return steps.train(kw["seed"], p.recipe, p.preset, p.data_dir, None, self.ex,
                                   self.parent, session=self.session)
            if kind == "distill":
                return steps.distill(kw["teacher"], kw["seed"], p.preset, p.overrides, p.data_dir, None,
                                     self.ex, self.parent, session=self.session)
            return steps.ensemble(kw["members"], "prob", p.data_dir, None, self.ex, self.parent,
                                  session=self.session)
        except ConfigError as e:
            raise StepFailed(name, str(e)) from None


class _Subprocesses(_Executor):
    """Independent steps as concurrent `kd-mlflow` processes: each is the same command a
    user would type, with the same seeds, split, batch order and thread count as with
    --jobs 1, so results do not depend on --jobs. (On a CPU, float results depend on
    the number of intra-op threads; it is recorded as the tag kd.threads.)"""

    def __init__(self, session, ex, jobs: int):
        super().__init__(session, ex)
        self.jobs = jobs

    def run_all(self, items):
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(lambda it: _outcome(it[1], *run_step_process(*self.command(*it))), items))

    def command(self, kind, name, kw):
        argv = [sys.executable, "-m", "kd_mlflow", *step_argv(self.plan, kind, kw, self.ex),
                "--parent-run", self.parent]
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
        env["MLFLOW_EXPERIMENT_ID"] = self.session.experiment_id
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
        # Ray sets OMP_NUM_THREADS=1 in its workers; CPU float results depend on the
        # thread count, so every step uses the driver's.
        env["KD_MLFLOW_THREADS"] = str(steps.torch.get_num_threads())
        return argv, env


class _Ray(_Subprocesses):
    """Each step is a Ray task that asks for its GPUs and runs the step's command on
    whichever node Ray picks; waves wait for the previous wave. Every task logs to the
    shared tracking server, so runs and tables are the same as with the local executor."""

    def __init__(self, session, ex, address: str | None, gpus_per_run: float | None,
                 local_gpus: int | None = None):
        super().__init__(session, ex, jobs=1)
        try:
            import ray
        except ImportError:
            raise ConfigError("executor", "ray", "Ray is not installed: pip install 'kd-mlflow[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            # A local instance when no address is given; GPUs may be declared so that
            # scheduling can be exercised on a machine without them.
            kwargs = {"address": address} if address else {"num_gpus": local_gpus}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        self.gpus = gpus_per_run if gpus_per_run is not None else (1 if has_gpus else 0)
        self.task = ray.remote(run_step_process)

    def run_all(self, items):
        refs = [self.task.options(num_gpus=self.gpus, num_cpus=1, name=name).remote(*self.command(kind, name, kw))
                for kind, name, kw in items]
        return [_outcome(name, *res) for (_, name, _), res in zip(items, self.ray.get(refs))]

    def close(self):
        if self.started:
            self.ray.shutdown()


def run_step_process(argv, env):
    """One step as a process: (exit code, stdout, stderr). A Ray task, too."""
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def _outcome(name, returncode, stdout, stderr) -> steps.Outcome:
    if returncode != 0:
        lines = stderr.strip().splitlines() or [f"exit {returncode}"]
        raise StepFailed(name, lines[-1])
    return steps.Outcome(stdout.strip().splitlines()[-1], "reusing finished run" in stderr)


def step_argv(plan: Plan, kind: str, kw: dict, ex: steps.Execution) -> list[str]:
    """The `kd-mlflow` command line of one step."""
    common = ["--device", ex.device] + (["--data-dir", plan.data_dir] if plan.data_dir else [])
    common += ["--cache-dir", str(ex.cache_dir)] if ex.cache_dir else []
    common += ["--deterministic"] if ex.deterministic else []
    if kind == "ensemble":
        return ["ensemble", "--members", ",".join(kw["members"]), *common]
    over = []
    for k, v in plan.overrides.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            over.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            over += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    if kind == "train":
        return ["train", "--seed", str(kw["seed"]), "--preset", plan.preset, *over, *common]
    return ["distill", "--teacher", kw["teacher"], "--seed", str(kw["seed"]), "--preset", plan.preset,
            *over, *common]


# --- the parent run --------------------------------------------------------

def _study_name(plan: Plan) -> str:
    return f"study-{plan.preset}-{plan.recipe.dataset}"


def _study_tags(plan: Plan, digest: str) -> dict:
    return {schema.STUDY: "true", schema.PRESET: plan.preset, schema.DATASET: plan.recipe.dataset,
            schema.SPLIT_DIGEST: digest,
            schema.CONFIG_HASH: steps._digest("study", plan.recipe.digest(), digest, plan.seeds,
                                              plan.student_seed_offset, plan.kd_seed)}


def _report(session, parent: str, plan: Plan, result: StudyResult) -> str:
    from . import compare, plots

    runs = session.runs_frame()
    run_ids = set(result.runs.values())
    runs = runs[runs["run_id"].isin(run_ids)]  # exactly this study's steps
    tables = compare.build_tables(runs)
    text = compare.render(tables, "markdown")
    figs = plots.figures(session, result.runs, tables)
    tracking.log_study(session, parent, {
        "tables.md": text, "tables.json": compare.render(tables, "json"),
        "tables.csv": compare.render(tables, "csv")},
        {"steps": result.runs, "trained": result.trained}, figs)
    plots.close(figs)
    return text
