"""Where a study's steps run: in this process, packed side by side, as concurrent
processes, or as Ray tasks.

Every executor implements :class:`Executor`: ``run_wave(steps, ctx, progress)`` runs one
wave of independent steps and returns their outcomes in order; ``close()`` releases what
it started. The study never asks which executor it holds. An executor only chooses
where; what a step is, its run name and how it runs belong to the step
(:mod:`kd_mlflow.study`). A step run here goes through ``ctx.run``; as a process (or a
Ray task), the same step serialised once (``ctx.to_json``) is run by the one internal
command, `kd-mlflow _step`, which hands its outcome back as JSON on stdout.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from . import waits
from .config import ConfigError
from .errors import USER, GaveUp, MissingExtra, StepFailed
from .runs import Outcome
from .tracking import server


class Executor(Protocol):
    def run_wave(self, items: list, ctx, progress) -> list[Outcome]: ...

    def close(self) -> None: ...


class InProcess:
    """One step at a time in this process (no start-up cost per step)."""

    def run_wave(self, items, ctx, progress) -> list[Outcome]:
        return [out for step in items for out in _here([step], ctx, progress)]

    def close(self) -> None:
        pass


class PackedWaves:
    """A wave of several trainings of one kind as one packed network (kd_mlflow.pack), in
    this process; a step kind packs if it has ``run_packed(steps, ctx)``. Anything else
    goes to the executor this one wraps."""

    def __init__(self, inner: Executor):
        self.inner = inner

    def run_wave(self, items, ctx, progress) -> list[Outcome]:
        kind = type(items[0])
        if len(items) < 2 or any(type(s) is not kind for s in items) or not hasattr(kind, "run_packed"):
            return self.inner.run_wave(items, ctx, progress)
        return _here(items, ctx, progress)

    def close(self) -> None:
        self.inner.close()


def _here(items, ctx, progress) -> list[Outcome]:
    """Steps run in this process (``ctx.run``): one, or a wave packed."""
    for step in items:
        progress.starting(step)
    t0 = time.monotonic()
    try:
        outs = ctx.run(items)
    except ConfigError as e:
        raise StepFailed(",".join(s.name for s in items), str(e), USER) from None
    return _ended(items, outs, progress, (time.monotonic() - t0) / len(items))


def _ended(items, outcomes: list[Outcome], progress, seconds: float) -> list[Outcome]:
    for step, out in zip(items, outcomes, strict=True):
        progress.finished(step, out, seconds)
    return outcomes


class Processes:
    """Independent steps as concurrent `kd-mlflow _step` processes, with the same seeds,
    split, batch order and thread count as in-process, so results do not depend on
    --jobs. (On a CPU, float results depend on the number of intra-op threads; it is
    recorded as the tag kd.threads.)"""

    def __init__(self, jobs: int):
        if jobs < 1:
            raise ConfigError("jobs", jobs, "must be >= 1")
        self.jobs = jobs

    def run_wave(self, items, ctx, progress) -> list[Outcome]:
        for step in items:
            progress.starting(step)
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.jobs) as pool:
            results = list(pool.map(lambda step: run_step_process(*command(step, ctx)), items))
        outcomes = [outcome(step.name, *res) for step, res in zip(items, results, strict=True)]
        return _ended(items, outcomes, progress, (time.monotonic() - t0) * self.jobs / len(items))

    def close(self) -> None:
        pass


class Ray:
    """Each step is a Ray task that asks for its GPUs and CPUs and runs the step's command
    on whichever node Ray picks; waves wait for the previous wave. Every task logs to the
    shared tracking server, so runs and tables are the same as with the local executor.

    Ray lowers its workers' priority (``worker_niceness``, 15 by default) and a process a
    worker starts inherits it: on a shared machine a study would run only when nothing
    else wants the CPU. The local instance started here keeps the command's priority;
    on an existing cluster a task's niceness is checked and reported."""

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None, local_gpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise MissingExtra("ray", "--executor ray") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            # A local instance when no address is given (its workers at this command's
            # priority); GPUs may be declared so that scheduling can be exercised on a
            # machine without them.
            if address:
                _connect(ray, address)
            else:
                ray.init(
                    include_dashboard=False,
                    log_to_driver=False,
                    num_gpus=local_gpus,
                    _system_config={"worker_niceness": 0},
                )
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        self.gpus = gpus_per_run if gpus_per_run is not None else (1 if has_gpus else 0)
        self.task = ray.remote(_ray_step)
        self.warned = False

    def run_wave(self, items, ctx, progress) -> list[Outcome]:
        for step in items:
            progress.starting(step)
        t0 = time.monotonic()
        refs = []
        for step in items:
            argv, env = command(step, ctx)
            # Ask for the CPUs the training will use: Ray never puts more trainings on
            # a node than it has cores.
            opts = {"num_gpus": self.gpus, "num_cpus": int(env["KD_MLFLOW_THREADS"]), "name": step.name}
            refs.append(self.task.options(**opts).remote(argv, env))
        results = self.ray.get(refs)
        self._check_priority(max(r[3] for r in results))
        outcomes = [outcome(step.name, *res[:3]) for step, res in zip(items, results, strict=True)]
        return _ended(items, outcomes, progress, time.monotonic() - t0)

    def _check_priority(self, task_nice: int) -> None:
        mine = os.nice(0)
        if task_nice > mine and not self.warned:
            self.warned = True
            print(
                f"note: Ray ran these trainings at nice {task_nice}, below this command's nice {mine}: they get a CPU "
                "only when nothing else wants it; the cluster's operator can start its nodes with "
                "RAY_worker_niceness=0 (e.g. RAY_worker_niceness=0 ray start ...) to keep the submitter's priority",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _connect(ray, address: str) -> None:
    """``ray.init(address=...)``, bounded and voiced as every wait on the network is
    (:mod:`kd_mlflow.waits`). Ray retries an address that does not answer for minutes,
    inside calls that no signal interrupts, so the connection is made on a thread and
    abandoned at the bound (the command then ends; the thread with it)."""
    done, failed = threading.Event(), []

    def connect():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except BaseException as e:  # noqa: BLE001 (re-raised by the waiting thread, below)
            failed.append(e)
        finally:
            done.set()

    what = f"the Ray cluster at {address}"
    # Off the main thread Ray leaves SIGTERM to this command's own handler (a run marked
    # KILLED, exit 143), as wanted, and logs a warning that it did: not for the user.
    quiet = _Without("SIGTERM handler is not set")
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        threading.Thread(target=connect, name="kd-mlflow-ray-init", daemon=True).start()
        with waits.waiting(what) as bound:
            if not done.wait(bound):
                raise GaveUp(what, bound)
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)
    if failed:
        raise failed[0]


class _Without(logging.Filter):
    """Drops the log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _ray_step(argv, env):
    """A Ray task: the step as a process, and the niceness it ran at."""
    return (*run_step_process(argv, env), os.nice(0))


def command(step, ctx) -> tuple[list[str], dict]:
    """The step as a `kd-mlflow _step` command line, and the environment it runs in."""
    import torch

    argv = [sys.executable, "-m", "kd_mlflow", "_step", ctx.to_json([step])]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["MLFLOW_EXPERIMENT_ID"] = ctx.session.experiment_id
    env["MLFLOW_TRACKING_URI"] = server.tracking_uri()
    # Ray sets OMP_NUM_THREADS=1 in its workers; CPU float results depend on the
    # thread count, so every step uses the driver's.
    env["KD_MLFLOW_THREADS"] = str(torch.get_num_threads())
    return argv, env


def run_step_process(argv, env):
    """One step as a process: (exit code, stdout, stderr). A Ray task, too."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def outcome(name, returncode, stdout, stderr) -> Outcome:
    if returncode != 0:
        lines = stderr.strip().splitlines() or [f"exit {returncode}"]
        last = lines[-1].removeprefix("kd-mlflow: ").removeprefix("error: ")
        raise StepFailed(name, last, returncode)
    lines = stdout.strip().splitlines()
    try:
        return Outcome.from_json(lines[-1])
    except (IndexError, ValueError, KeyError):
        raise StepFailed(name, f"no outcome on stdout: {(lines or [''])[-1][:200]!r}") from None
