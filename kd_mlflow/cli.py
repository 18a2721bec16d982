"""The thin edge: parse, make one library call, map domain errors to exit codes.

Exit codes: 0 success, 2 bad input (one line naming the value, nothing created),
1 tracking server unreachable, 128 + signal when interrupted (run marked KILLED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__, config, errors, waits
from .config import ConfigError, Recipe
from .errors import one_line


class _Optional(click.ParamType):
    """A typed value where "" means "not given" (``-P name=`` under `mlflow run`, or an
    empty environment variable in a script)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", "value")

    def get_metavar(self, param, ctx=None):
        return self.inner.get_metavar(param, ctx)

    def convert(self, value, param, ctx):
        if value is None or value == "":
            return None
        return self.inner.convert(value, param, ctx)


class _Parsed(click.ParamType):
    """A value read by config's own parser, ``parse(name, text)``: one reading of a value
    whether typed here or logged by a run; its refusal in click's words."""

    def __init__(self, parse, name: str, choices: tuple = ()):
        self.parse, self.name, self.choices = parse, name, choices

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.choices) + "]" if self.choices else None

    def convert(self, value, param, ctx):
        if not isinstance(value, str):  # already read (a default, or click's second pass)
            return value
        try:
            return self.parse(param.name if param else self.name, value)
        except ConfigError as e:
            self.fail(f"{value!r} is {e.reason}", param, ctx)


def _yes_no() -> _Parsed:
    return _Parsed(config.yes_no, "boolean")


def _number(kind: type = int, min=None, above=None) -> _Parsed:
    """An int or a float with a bound, in plain words ("'abc' is not an integer")."""
    return _Parsed(lambda name, text: config.number(name, text, kind, min, above), config.number_word(kind))


def _field(name: str) -> _Parsed:
    """A recipe field's value, read as the run's logged param is (config.field_value)."""
    kind = type(getattr(Recipe, name))
    choices = config.CHOICES.get(name, ()) if name != "model" else ()  # a model may be any wrn-D-K too
    return _Parsed(lambda _, text: config.field_value(name, text), config.number_word(kind) or name, choices)


class _ModelName(click.ParamType):
    """A registered model's name: refused here if MLflow would refuse it after training."""

    name = "name"

    def convert(self, value, param, ctx):
        if any(c in str(value) for c in "/:") or not str(value).strip():
            self.fail(f"{value!r}: a registered model's name cannot be empty or hold '/' or ':'", param, ctx)
        return str(value)


def _recipe_options(grid: bool = False):
    """One --flag per Recipe field, generated from the recipe's field list: every preset
    value can be overridden; ``grid``: a comma list of values to try instead (tuples,
    such as --mean, cannot be swept)."""

    def add(func):
        for f in reversed(dataclasses.fields(Recipe)):
            if grid and isinstance(f.default, tuple):
                continue
            text = f"Override the preset's {f.name}."
            if grid:
                text = f"Values of {f.name} to try, comma-separated."
            elif isinstance(f.default, bool):  # and --no-augment, as --augment false
                dashed = f.name.replace("_", "-")
                func = click.option(f"--no-{dashed}", f"no_{f.name}", is_flag=True, help=f"Same as --{dashed} false.")(
                    func
                )
                text = text[:-1] + " (true or false)."
            elif f.name == "model":
                text = text[:-1] + " (`kd-mlflow models` lists them; any wrn-D-K too)."
            func = _opt(f.name, click.STRING if grid else _field(f.name), help=text)(func)
        return func

    return add


def _opt(name: str, kind=click.STRING, param: str | None = None, **attrs):
    """--batch-size (and --batch_size, for MLflow's extra parameters) for the parameter
    ``name``; "" is not given (None). A yes/no option alone means true: --augment,
    --augment false (what `mlflow run -P augment=false` passes)."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] if "_" not in name else [dashed, "--" + name]
    if kind.name == "boolean":
        attrs.update(is_flag=False, flag_value="true")
    return click.option(*spellings, param or name, type=_Optional(kind), **{"default": None, **attrs})


def _all(*options):
    """Several options as one decorator, in the order --help lists them."""

    def add(func):
        for option in reversed(options):
            func = option(func)
        return func

    return add


def _overrides(kw: dict) -> dict:
    """The recipe fields given on the command line; ``--no-x`` is ``x`` false."""
    out = {}
    for f in dataclasses.fields(Recipe):
        if kw.get(f"no_{f.name}"):
            if kw.get(f.name) is True:
                dashed = f.name.replace("_", "-")
                raise click.UsageError(f"--{dashed} and --no-{dashed} contradict each other")
            out[f.name] = False
        elif kw.get(f.name) is not None:
            out[f.name] = kw[f.name]
    return out


# How a command runs, never what it computes: one entry per field of steps.Execution,
# by its name (a command reads them back in _execution).
_execution_options = _all(
    click.option(
        "--device", default="auto", show_default=True, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."
    ),
    click.option("--compile", "compile", is_flag=True, help="torch.compile the model."),
    click.option("--deterministic", is_flag=True, help="No cudnn autotuning; deterministic kernels."),
    click.option("--force", is_flag=True, help="Train anew even if a FINISHED run exists."),
    _opt(
        "cache_dir",
        click.Path(file_okay=False, path_type=Path),
        help="Decoded datasets and checkpoints [~/.cache/kd-mlflow or $KD_MLFLOW_CACHE].",
    ),
    # What a run logs besides its result: set in the environment, so that it reaches the
    # processes a study starts (as --network-timeout does); not Execution fields.
    _opt(
        "log_checkpoints",
        _number(int, min=0),
        expose_value=False,
        callback=lambda ctx, param, value: _log_checkpoints(value),
        metavar="N",
        help="Every N epochs, log the network as a LoggedModel of its run with that epoch's "
        "val_acc and val_loss: the Models tab ranks a run's checkpoints [0: off].",
    ),
    click.option(
        "--no-system-metrics",
        is_flag=True,
        expose_value=False,
        callback=lambda ctx, param, off: off and os.environ.update(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false"),
        help="No CPU, memory and GPU metrics on the runs (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false).",
    ),
)


def _log_checkpoints(value) -> None:
    from . import runs

    if value is not None:
        os.environ[runs.LOG_CHECKPOINTS_ENV] = str(value)
    runs.log_checkpoints_every()  # a bad $KD_MLFLOW_LOG_CHECKPOINTS is refused here, before any run


def _execution(kw: dict):
    from .steps import Execution

    return Execution(**{f.name: kw[f.name] for f in dataclasses.fields(Execution)})


def _network(func):
    """--network-timeout, on every command; checks $KD_MLFLOW_NETWORK_TIMEOUT too."""

    def check(ctx, param, value):
        waits.set_timeout(value)
        waits.timeout()  # a bad $KD_MLFLOW_NETWORK_TIMEOUT is refused here, before any wait

    return _opt(
        "network_timeout",
        _number(float, above=0),
        expose_value=False,
        callback=check,
        metavar="SECONDS",
        help=f"How long a wait on the network (the tracking server, a download) may last before it gives up "
        f"[${waits.ENV}, else {waits.DEFAULT_TIMEOUT:g}].",
    )(func)


_register = click.option(
    "--register",
    # Not _Optional: `--register ''` is a name typed empty, refused (it registered nothing, silently).
    type=_ModelName(),
    default=None,
    metavar="NAME",
    help="Also register the run's model in the Model Registry as NAME.",
)

_preset = click.option(
    "--preset", type=click.Choice(config.CHOICES["preset"]), default="seed-report", show_default=True
)


# Where a wave's steps run: --jobs N processes, --executor ray, or --pack (read in _executor).
_executor_options = _all(
    click.option(
        "--jobs",
        type=_number(min=1),
        default=1,
        show_default=True,
        help="Independent steps run concurrently, as separate processes (local executor).",
    ),
    click.option(
        "--executor",
        type=click.Choice(config.EXECUTORS),
        default="local",
        show_default=True,
        help="ray: each step is a Ray task (pip install 'kd-mlflow[ray]').",
    ),
    _opt("ray_address", help="An existing Ray cluster [a local instance]."),
    _opt(
        "gpus_per_run", _number(float, min=0), help="GPUs each Ray task asks for [1 if the cluster has GPUs, else 0]."
    ),
    _opt("ray_local_gpus", _number(min=0), hidden=True, help="GPUs a local Ray instance declares (tests scheduling)."),
    click.option(
        "--pack",
        is_flag=True,
        help="Train the seeds, and the SD students, of a wave side by side as "
        "one packed network (in this process; pays off on a GPU).",
    ),
)


def _executor(kw: dict):
    from . import executors

    jobs, pack = kw["jobs"], kw["pack"]
    if pack and (jobs > 1 or kw["executor"] != "local"):
        raise ConfigError(
            "pack", "--jobs/--executor", "a packed wave runs in this process: drop --jobs and --executor, or --pack"
        )
    runner: executors.Executor
    if kw["executor"] == "ray":
        runner = executors.Ray(kw["ray_address"], kw["gpus_per_run"], kw["ray_local_gpus"])
    else:
        runner = executors.InProcess() if jobs == 1 else executors.Processes(jobs)
    return executors.PackedWaves(runner) if pack else runner


_experiment = _opt("experiment", help="Experiment name [$MLFLOW_EXPERIMENT_NAME, $MLFLOW_EXPERIMENT_ID, or mysteries].")
_data_dir = _opt(
    "data_dir",
    help="cifar*: torchvision root (downloaded if missing); folder: an ImageFolder "
    "tree with train/ and test/, or a .tar.gz of one.",
)


def _writes(*between, grid: bool = False):
    """The options of a command that trains and writes runs, in --help's order: the data,
    the experiment, ``between`` (--register), the recipe's fields, how it runs."""
    return _all(_data_dir, _experiment, *between, _recipe_options(grid), _execution_options)


class _Group(click.Group):
    """Every way a command ends goes through here: the exit code and the last line are
    decided by :func:`kd_mlflow.errors.verdict`, in one place."""

    def main(self, *args, **kwargs):
        with _signals_raise():
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
            except click.exceptions.Exit as e:
                rv = e.exit_code
            except click.Abort as e:  # click's word for Ctrl-C, and for an EOFError, while it runs
                rv = _end(e.__cause__ if isinstance(e.__cause__, Exception) else KeyboardInterrupt())
            except click.UsageError as e:
                rv = _end(e)
            except click.ClickException as e:
                click.echo(f"kd-mlflow: error: {one_line(e.format_message())}", err=True)
                rv = e.exit_code
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  (every ending gets its verdict, in one place)
            if errors.traceback_wanted() and errors.verdict(e)[1].startswith("internal error"):
                # Printed here, not re-raised: click's main takes any EOFError that reaches
                # it for Ctrl-C (click.Abort), which said "interrupted (SIGINT)" for a bug.
                traceback.print_exception(e)
            return _end(e)


def _end(e: BaseException) -> int:
    """Print the one line for ``e``, tell the run `mlflow run` made, return the exit code."""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.exceptions.NoArgsIsHelpError) and isinstance(ctx, click.Context):
        click.echo(ctx.get_help())  # the help on stdout; the one line says what is missing
        names = [n for n in main.list_commands(ctx) if not main.commands[n].hidden]
        code, line = errors.USER, f"error: give a command: {', '.join(names)}"
    elif isinstance(e, click.UsageError):
        code, line = errors.USER, f"error: {one_line(e.format_message())}"
    else:
        code, line = errors.verdict(e)
    click.echo(f"kd-mlflow: {line}", err=True)
    _tell_adopted_run(e, code, line)
    return code


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM ends a command as Ctrl-C does (exit 143, a run marked KILLED), wherever it
    lands, not only while a run is open. The previous handler is back afterwards (a
    command run inside a test process)."""
    import signal

    def on_term(signum, frame):
        raise errors.Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _tell_adopted_run(e: BaseException, code: int, line: str) -> None:
    """Under `mlflow run`, MLflow made a run before this command could refuse: end it
    FAILED with the reason in kd.failure (KILLED on a signal), never RUNNING. Not when
    the tracking server is what failed: it cannot be told."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or isinstance(e, (errors.TrackingUnavailable, errors.TrackingRefused, errors.GaveUp)):
        return
    from . import tracking

    tracking.fail_run_by_id(run_id, line.removeprefix("error: "), status="KILLED" if code > 128 else "FAILED")


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="kd-mlflow")
def main():
    """Ensembles, knowledge distillation and self-distillation as tracked MLflow runs."""


@main.command()
@_network
@_opt("seed", _number(min=0), help="Model seed: the initialisation only.")
@_opt("seeds", help="Several seeds (e.g. 0-4), one run each, instead of --seed.")
@click.option(
    "--pack",
    is_flag=True,
    help="With --seeds: train them side by side as one packed network (each still its own run; pays off on a GPU).",
)
@_preset
@_writes(_register)
def train(seed, seeds, pack, preset, data_dir, experiment, register, **kw):
    """Train one model and log one MLflow run; prints its run id (one per line with --seeds)."""
    recipe = config.resolve(preset, **_overrides(kw))  # refused here: before torch and mlflow load
    if (seed is None) == (seeds is None):
        raise click.UsageError("give exactly one of --seed and --seeds")
    if pack and seeds is None:
        raise click.UsageError("--pack needs --seeds")
    wanted = config.parse_seeds(seeds) if seeds is not None else None
    from . import steps, train
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training

    recipe = train.plan_run(recipe, preset, kw["device"])
    where = {"data_dir": data_dir, "experiment": experiment, "ex": _execution(kw)}
    if wanted is None:
        click.echo(steps.train(seed, recipe, preset, register=register, **where).run_id)
        return
    if register:
        raise ConfigError("register", register, "register one run at a time (--seed)")
    outs = (
        steps.train_wave(wanted, recipe, preset, **where)
        if pack
        else [steps.train(s, recipe, preset, **where) for s in wanted]
    )
    for out in outs:
        click.echo(out.run_id)


@main.command()
@_network
@click.option("--teacher", required=True, help="Run id of a train run (SD), an ensemble run (KD) or a student.")
@click.option("--seed", type=_number(min=0), required=True, help="The student's model seed.")
@_opt("preset", click.Choice(config.CHOICES["preset"]), help="The student's preset [the teacher's].")
@_writes(_register)
def distill(teacher, seed, preset, data_dir, experiment, register, **kw):
    """Train a student on a teacher's probabilities (SD if the teacher is one network of
    the student's architecture, KD otherwise: an ensemble, or --model another); prints
    its run id."""
    overrides = _overrides(kw)
    config.resolve(preset or "seed-report", **overrides)  # each value checked before any import
    _check_run_id("teacher", teacher)
    from . import steps
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training
    out = steps.distill(
        teacher,
        seed,
        preset=preset,
        overrides=overrides,
        data_dir=data_dir,
        experiment=experiment,
        ex=_execution(kw),
        register=register,
    )
    click.echo(out.run_id)


@main.command()
@_network
@_opt("members", help="Comma-separated run ids.")
@_opt("seeds", help="Seeds of FINISHED train runs (e.g. 0-4 or 0,1,2), instead of --members.")
@_opt("preset", click.Choice(config.CHOICES["preset"]), help="With --seeds: the members' preset.")
@_opt("dataset", click.Choice(config.DATASETS), help="With --seeds: the members' dataset.")
@click.option(
    "--combine",
    type=click.Choice(config.COMBINES),
    default="prob",
    show_default=True,
    help="Average probabilities (the report) or logits.",
)
@_opt(
    "allow_mixed",
    _yes_no(),
    default=False,
    help="Allow members of different recipes (the ensemble is then shown apart, in no group's mean).",
)
@_data_dir
@_experiment
@_execution_options
def ensemble(members, seeds, preset, dataset, combine, allow_mixed, data_dir, experiment, **kw):
    """Evaluate an ensemble of finished runs and log it as a run; prints its run id."""
    if bool(members) == bool(seeds):
        raise ConfigError("members", members or "", "give exactly one of --members and --seeds")
    ids = [m.strip() for m in members.split(",") if m.strip()] if members else None
    for rid in ids or ():
        _check_run_id("members", rid)
    wanted = config.parse_seeds(seeds) if seeds else None
    from . import steps, tracking
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training
    session = tracking.connect(experiment)
    ids = ids or steps.members_for_seeds(wanted or [], preset, dataset, session=session)
    where = {"data_dir": data_dir, "experiment": experiment, "session": session}
    out = steps.ensemble(ids, combine=combine, ex=_execution(kw), allow_mixed=bool(allow_mixed), **where)
    click.echo(out.run_id)


@main.command()
@_network
@click.option("--seeds", required=True, help="The members' model seeds, e.g. 0-4 or 0-9 (at least two).")
@_preset
@_writes()
def joint(seeds, preset, data_dir, experiment, **kw):
    """Train the seeds' networks as one model whose logits are the mean of theirs (each
    initialised as its train run's, cross-entropy on the mean: Allen-Zhu and Li's
    "training the average directly"); logs one run, prints its run id."""
    recipe = config.resolve(preset, **_overrides(kw))  # refused here: before torch and mlflow load
    wanted = config.parse_seeds(seeds)
    from . import steps, train
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training
    recipe = train.plan_run(recipe, preset, kw["device"])
    out = steps.joint(wanted, recipe, preset, data_dir=data_dir, experiment=experiment, ex=_execution(kw))
    click.echo(out.run_id)


@main.command("_step", hidden=True)
@click.argument("job")
def step(job):
    """Run a study's step, serialised as JSON (kd_mlflow.study.Context.to_json), as a
    process or a Ray task does; prints each outcome as JSON."""
    from . import study

    items, ctx = study.Context.from_json(job)
    for out in ctx.run(items):
        click.echo(out.to_json())


@main.command()
@_network
@_experiment
@click.option("--format", "fmt", type=click.Choice(config.FORMATS), default="markdown", show_default=True)
@_opt(
    "output",
    click.Path(),
    help="Write here instead of stdout: a file, or for --format csv a folder of one file per table.",
)
@_opt(
    "table", help="With --format csv: this table only (runs, the default: every listed run once; seeds, summary, ...)."
)
@_opt("preset", help="Only this preset's runs.")
@_opt("dataset", help="Only this dataset's runs.")
@_opt("group", help="Only the group whose label or id starts with this (labels head each table).")
@click.option(
    "--intervals/--no-intervals",
    default=True,
    show_default=True,
    help="Every gain with its 95% intervals and the mechanism figures, from the runs' predictions.",
)
def compare(experiment, fmt, output, table, preset, dataset, group, intervals):
    """Rebuild the report's tables from the tracking server."""
    from . import report, tables

    tables.check_table(fmt, table)
    folder = Path(output) if output and fmt == "csv" else None  # one file per table in it
    if output:  # refused before any wait on the server
        out = Path(output)
        if out.exists() and out.is_dir() != bool(folder):
            raise config.ConfigError("output", output, "give a folder for --format csv, a file for markdown or json")
        _check_writable("output", out / f"{tables.RUNS}.csv" if folder and out.is_dir() else out)
    kw = {"preset": preset, "dataset": dataset, "group": group, "intervals": intervals}
    texts = report.compare(experiment, fmt, table=table, every=bool(folder) and table is None, **kw)
    if not output:
        click.echo(texts[table])
        return
    if folder:
        folder.mkdir(exist_ok=True)
    for name, text in texts.items():
        path = folder / f"{name or tables.RUNS}.csv" if folder else Path(output)
        try:
            path.write_text(text)
        except OSError as e:  # a full disk: name the file (a failed write does not)
            raise OSError(e.errno, e.strerror, str(path)) from None


@main.command()
@_network
@_experiment
def backfill(experiment):
    """Log on the experiment's runs what compare finds missing: predictions (computed
    from a run's logged weights) and calibration metrics, once; prints what it added,
    one line per run. Needs write access to the runs (compare never writes)."""
    from . import report
    from .tracking import server

    server.check_write_access(experiment)
    added = report.backfill(experiment)
    for line in added:
        click.echo(line)
    if not added:
        click.echo("nothing added: every run that can have them has its predictions and calibration metrics", err=True)


def _check_writable(option: str, path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(option, str(path), f"no folder {folder} to write it in")
    if not os.access(folder, os.W_OK):
        raise ConfigError(option, str(path), f"folder {folder} is not writable")


@main.command()
@_network
@_preset
@click.option("--seeds", default=config.STUDY_SEEDS, show_default=True, help="Teacher seeds, e.g. 0-4 or 0,1,2.")
@click.option(
    "--student-seed-offset",
    "--student_seed_offset",
    "offset",
    type=_number(min=1),
    default=10,
    show_default=True,
    help="SD student of seed i has seed i + offset.",
)
@click.option(
    "--kd-seeds",
    "--kd_seeds",
    "--kd-seed",  # the one-seed spelling studies were run with: one option, one concept
    "--kd_seed",
    "kd_seeds",
    default=None,
    help="Seeds of the KD students of the ensemble, e.g. 100-104: shown as mean ± std with a t interval "
    "[the preset's: 42 for seed-report, else 100].",
)
@_executor_options
@_opt(
    "register_as",
    _ModelName(),
    metavar="NAME",
    help="Register the KD student as NAME, alias champion [the experiment's name + -kd-student].",
)
@click.option("--no-register", is_flag=True, help="Do not register the KD student.")
@_opt(
    "joint",
    _yes_no(),
    "joint_step",
    default=False,
    help="Also train the seeds' networks as one averaged model (kd-mlflow joint): a step more.",
)
@_opt(
    "student_model",
    _field("model"),
    help="The KD student's architecture (only it) [the preset's: resnet20 for kd-pairs, "
    "resnet8 for cpu-pairs; else the teachers'], at its published width unless --student-width.",
)
@_opt(
    "student_width",
    _number(min=1),
    help="The KD student's width in 64ths of its published channels (64 = as published) "
    "[64 with --student-model; else the teachers'].",
)
@click.option(
    "--sweep-kd",
    "--sweep_kd",
    "sweep_kd",
    multiple=True,
    metavar="FIELD=V1,V2",
    help="Before the KD step, sweep the KD student over these values (repeat for a grid, e.g. "
    "--sweep-kd temperature=1,2,4 --sweep-kd alpha=0.5,1.0); the KD row uses the setting chosen on validation.",
)
@_writes()
def reproduce(
    preset, seeds, offset, kd_seeds, register_as, no_register, joint_step, sweep_kd, data_dir, experiment, **kw
):
    """Run the whole study (seeds, ensemble, KD, SD, SD ensemble; with --joint the joint
    model too) and print its tables.
    Finished steps are reused, so a rerun does only what is missing."""
    overrides = _overrides(kw)
    recipe = config.resolve(preset, **overrides)
    kd_seeds = config.study_kd_seeds(preset) if kd_seeds is None else config.parse_seeds(kd_seeds, "kd_seeds")
    grid = _sweep_kd_grid(sweep_kd)  # refused here, before imports
    from . import study, train
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training

    recipe, seeds, kd_seeds = train.plan_run(recipe, preset, kw["device"]), config.parse_seeds(seeds), tuple(kd_seeds)
    more = {"student_model": kw["student_model"], "student_width": kw["student_width"], "joint": bool(joint_step)}
    plan = study.Plan(preset, recipe, overrides, seeds, offset, kd_seeds, data_dir, sweep_kd=grid, **more)
    register = None if no_register else (register_as or study.DEFAULT_REGISTRY)
    result = study.reproduce(
        plan, experiment=experiment, ex=_execution(kw), executor=_executor(kw), register_as=register
    )
    click.echo(result.tables)
    click.echo(
        f"study run {result.parent_run_id}: {len(result.trained)} step(s) ran, "
        f"{len(result.runs) - len(result.trained)} reused",
        err=True,
    )


def _sweep_kd_grid(given: tuple):
    """--sweep-kd temperature=1,2 --sweep-kd alpha=0.5,1 -> the study's KD sweep, or None."""
    if not given:
        return None
    lists: dict[str, str] = {}
    for text in given:
        name, sep, values = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError("sweep_kd", text, "not FIELD=V1,V2, e.g. temperature=1,2,4")
        if name in lists:
            raise ConfigError("sweep_kd", text, f"{name} is given twice")
        lists[name] = values
    from .sweep import KDSweep, parse_grid

    return KDSweep(parse_grid(lists))


@main.command()
@click.option("--format", "fmt", type=click.Choice(config.MODEL_FORMATS), default="table", show_default=True)
@click.option("--width", type=_number(min=1), default=64, show_default=True, help="64 = as published.")
@click.option("--classes", type=_number(min=1), default=10, show_default=True)
@click.argument("names", nargs=-1)
def models(fmt, width, classes, names):
    """List the model registry: each network's parameters and forward GFLOPs for one
    image at its input size (counted by torch.utils.flop_counter: a multiply-add is 2).
    NAMES: only these networks (any wrn-D-K too, e.g. `kd-mlflow models wrn-22-4`)."""
    import json

    from . import models as registry

    names = [config.check_model(n) for n in names] or list(config.MODELS)
    rows = [registry.size(name, width, classes) for name in names]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<16}{'parameters':>14}{'GFLOPs':>10}{'input':>7}  {'stem':<9}{'pack':<6}family")
    for r in rows:
        click.echo(
            f"{r['name']:<16}{r['parameters']:>14,}{r['gflops']:>10.3f}{r['input_size']:>7}  {r['stem']:<9}"
            f"{'yes' if r['packable'] else 'no':<6}{r['family']}"
        )
    click.echo(f"width {width} ({width}/64 of the published channels), {classes} classes; any wrn-D-K (D = 6n + 4) too")


def _check_run_id(option: str, run_id: str) -> None:
    """MLflow run ids are 32 hex digits: anything else is refused before any connection."""
    if not (len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id)):
        raise ConfigError(option, run_id, "not an MLflow run id (32 hex digits)")


@main.command()
@click.option("--teacher", required=True, help="Run id of the teacher: an ensemble run (KD) or a train run (SD).")
@click.option("--seeds", default="100", show_default=True, help="Student seeds of every setting, e.g. 100-102.")
@click.option(
    "--show-test",
    "--show_test",
    "show_test",
    is_flag=True,
    help="Print every setting's test accuracy too (the choice never uses it).",
)
@click.option(
    "--search",
    type=click.Choice(config.SEARCHES),
    default="grid",
    show_default=True,
    help="grid: every combination of the lists; optuna: --trials settings asked of Optuna's TPE sampler, "
    "over ranges lo:hi (or lo:hi:log) and lists (needs the extra: pip install 'kd-mlflow[optuna]').",
)
@_opt("trials", _number(min=1), help="Settings an optuna search tries.")
@click.option(
    "--search-seed",
    "--search_seed",
    "search_seed",
    type=_number(min=0),
    default=0,
    show_default=True,
    help="Seed of the optuna search's sampler.",
)
@_executor_options
@_writes(grid=True)
def sweep(teacher, seeds, show_test, search, trials, search_seed, data_dir, experiment, **kw):
    """Students of one teacher over a grid of settings, as runs nested under one sweep
    run; the setting of best mean validation accuracy is chosen and only its test
    accuracy reported. A search (--search optuna --trials N --temperature 1:8 --alpha
    0:1) asks Optuna for N settings instead, chosen by the same rule; a searched float is
    rounded to 3 significant digits, so that a rerun reuses its runs."""
    from . import sweep as sweep_mod

    optuna = search == "optuna"
    lists = {f.name: kw[f.name] for f in dataclasses.fields(Recipe) if kw.get(f.name) is not None}
    grid = sweep_mod.parse_grid(lists, ranges=optuna)  # refused here, before imports
    if optuna != (trials is not None):
        raise ConfigError("trials", trials or "", "give --trials N with --search optuna, and only with it")
    _check_run_id("teacher", teacher)
    if optuna:
        sweep_mod.optuna_module()  # installed? (exit 1 if not, before any run exists)
    from .tracking import server

    server.check_write_access(experiment)  # refused here: before any data or training
    search = sweep_mod.Search(trials, search_seed) if optuna else None
    plan = sweep_mod.SweepPlan(teacher, config.parse_seeds(seeds), grid, data_dir=data_dir, search=search)
    text, _ = sweep_mod.run(plan, experiment=experiment, ex=_execution(kw), executor=_executor(kw), show_test=show_test)
    click.echo(text)
