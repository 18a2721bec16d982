"""The MLflow adapter: with :mod:`kd_mlflow.runs` (a run's life), the module that writes
and reads MLflow's runs, models and experiments (each call through
:mod:`kd_mlflow.tracking.server`; a configuration's claim through :mod:`kd_mlflow.tracking.claims`).

Where runs go: MLflow's own resolution of the tracking URI (MLFLOW_TRACKING_URI, else
MLflow 3's default ``sqlite:///mlflow.db``). Which experiment: ``--experiment``, else
MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME, else ``mysteries``; under
``mlflow run`` the run MLflow created (MLFLOW_RUN_ID) is adopted, in its experiment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import schema
from ..config import YES_NO, ConfigError
from ..errors import TrackingRefused, TrackingUnavailable, one_line
from . import server
from .claims import claimed
from .server import DEFAULT_EXPERIMENT, Session, impatient, tracking_uri, watched

DEFAULT_EXPERIMENT_ID = "0"  # MLflow's own "Default" experiment
WEIGHTS_PATH = "weights/model.pt"
SELECTED_MODEL = "model"  # the LoggedModel of the run's selected weights (runs:/<id>/model)
CHECKPOINT_METRICS = ("val_acc", "val_loss")  # an epoch's metrics linked to its checkpoint
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI opens on training runs
UNFINISHED = ("RUNNING", "KILLED", "FAILED", "SCHEDULED")


def connect(experiment: str | None = None, create: bool = True) -> Session:
    """Resolve the experiment (see the module docstring); ``create=False`` refuses to
    create a missing one (``compare`` must not)."""
    uri = tracking_uri()
    server.warn_plain_credentials(uri)
    try:
        client = server.client()
    except MlflowException:  # a scheme MLflow has no store for
        raise ConfigError(
            "MLFLOW_TRACKING_URI",
            uri,
            "MLflow has no tracking store for this scheme: use http(s)://HOST:PORT, sqlite:///FILE or postgresql://...",
        ) from None
    except OSError as e:  # a local store that cannot be made (sqlite:////no/such/dir/mlflow.db)
        raise ConfigError("MLFLOW_TRACKING_URI", uri, f"cannot open the store: {e.strerror or e}") from None
    # The run `mlflow run` created, or a run the caller has open (reproduce inside an
    # active run): that run is adopted, in its experiment.
    active = mlflow.active_run()
    run_id = os.environ.get("MLFLOW_RUN_ID") or (active.info.run_id if active else None)
    if run_id and not experiment:
        exp_id = Session(client, "", None).get_run(run_id, "MLFLOW_RUN_ID").info.experiment_id
        return Session(client, exp_id, run_id, exp_id == DEFAULT_EXPERIMENT_ID)
    exp_id = _resolve_experiment(client, experiment, create)
    return Session(client, exp_id, run_id, exp_id == DEFAULT_EXPERIMENT_ID)


def _resolve_experiment(client, name, create) -> str:
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not name and env_id:
        try:
            exp = client.get_experiment(env_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            exp = None
        if exp is None:
            raise ConfigError("MLFLOW_EXPERIMENT_ID", env_id, _no_such_experiment(client))
        return exp.experiment_id
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        if not create:
            raise ConfigError("experiment", name, _no_such_experiment(client))
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:
            # Two launches at once: the one that lost the race uses the winner's experiment.
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ConfigError("experiment", name, "experiment is deleted")
    if create and EXPERIMENT_KIND_TAG not in exp.tags:  # a read (compare) never writes, not even this tag
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException:
            # Launches at once into an experiment made elsewhere: on PostgreSQL one insert
            # of the tag wins and the others fail (a duplicate key, HTTP 400): it is set.
            if EXPERIMENT_KIND_TAG not in client.get_experiment(exp.experiment_id).tags:
                raise
    return exp.experiment_id


def _no_such_experiment(client, limit: int = 8) -> str:
    """ "no such experiment on URI", and which ones there are."""
    found = client.search_experiments(max_results=limit + 1)
    names = [f"{e.name} (id {e.experiment_id})" for e in found[:limit]]
    more = ", ..." if len(found) > limit else ""
    there = f"; experiments there: {', '.join(names)}{more}" if names else "; it has no experiments"
    return f"no such experiment on {tracking_uri()}{there}"


def _same_value(a: str, b: str) -> bool:
    if a.strip("'\"") == b:
        return True
    if b in ("True", "False"):  # `-P augment=true` is the recipe's True
        return str(YES_NO.get(a.strip("'\"").lower())) == b
    try:
        return float(a) == float(b)
    except ValueError:
        return False


# --- what a run measures besides its epochs ----------------------------------------

# The split's parts as a run's inputs: part -> MLflow's input context.
DATASET_PARTS = {"train": "training", "validation": "validation", "test": "testing"}


def measured_on(metric: str) -> str | None:
    """The part of the split a result metric was measured on (final_val_acc: validation;
    final_test_acc, test_nll, member_0_test_acc: test), or None (best_epoch)."""
    words = metric.split("_")
    return "validation" if "val" in words else "test" if "test" in words else None


# Seconds between two samples of the machine (MLflow's own default; its
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it). Each sample costs the run one
# status request and one batch of metrics: benchmarks/system_metrics_bench.py measures
# the epoch time with and without.
SYSTEM_METRICS_INTERVAL = 10.0
_SAID: set[str] = set()  # notes said once per process


def system_metrics_on() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set false (MLflow's own switch,
    which kd-mlflow reads as on when unset: its runs are trainings)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

    return not switch.is_set() or bool(switch.get())


def start_system_metrics(run_id: str, resume: bool):
    """MLflow's own monitor of the machine (CPU, memory, disk, network; NVIDIA GPUs where
    nvidia-ml-py is installed), attached to the run by its id: the run's "System
    metrics" tab. ``resume``: its steps continue after the run's last. None when off,
    or where psutil is missing (said once: training goes on without)."""
    if not system_metrics_on():
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil, imported by MLflow's CPU monitor
        if "psutil" not in _SAID:
            _SAID.add("psutil")
            print(f"note: no system metrics ({e}): pip install psutil", file=sys.stderr)
        return None
    import logging

    # Its start, stop and "no GPU" notes are INFO lines on every run, and its warnings
    # repeat what the run's own calls say in one line (a server away): kept for DEBUG.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=resume, tracking_uri=tracking_uri()
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor, and log the samples of the interval it was in: a run shorter
    than one interval still has its point (psutil's CPU share since the last sample)."""
    if monitor is None:
        return
    monitor.finish()
    monitor.collect_metrics()
    try:
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except (MlflowException, OSError) as e:  # requests' errors are OSErrors
        # The machine's last seconds are not worth a run: the run's own end says the rest.
        print(f"warning: the last system metrics were not logged: {one_line(str(e), 200)}", file=sys.stderr)


# --- a run being written ---------------------------------------------------


class RunWriter:
    """One run, written through the client by run id (never MLflow's fluent "active
    run"), so that several can be open at once and none depends on $MLFLOW_RUN_ID."""

    def __init__(self, session: Session, run_id: str | None, name: str, parent_run_id=None, identity=None):
        """``identity``: tags a new run is created with (its config hash), so that a process
        killed before the header is logged leaves a run the next launch finds and continues."""
        self.session = session
        resumed = run_id is not None or session.adopted_run_id is not None
        if run_id is None and session.adopted_run_id:
            run_id = session.adopted_run_id
        if run_id is None:
            tags = {**(identity or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run_id = session.client.create_run(session.experiment_id, run_name=name, tags=tags).info.run_id
        else:
            session.client.update_run(run_id, status="RUNNING", name=name)
        self.run_id = run_id
        # A run continued (resumed, or the one `mlflow run` made) continues its curves.
        self._system = start_system_metrics(run_id, resume=resumed)
        self._datasets: dict[str, tuple[str, str]] = {}  # part -> (name, digest), see log_dataset
        self._final: tuple[dict, int] = ({}, 0)  # the result metrics and their timestamp

    def log_header(self, params: dict, tags: dict) -> None:
        """Params are immutable in MLflow, and `mlflow run` has already logged the values
        the user typed: keep those that agree with the resolved ones, and log any that
        differ in form (1e-2 vs 0.01) or in value under "resolved.<name>"."""
        held = self.session.client.get_run(self.run_id).data.params
        fresh = {}
        for key, value in params.items():
            value = str(value)
            if key not in held:
                fresh[key] = value
            elif not _same_value(held[key], value):
                fresh[schema.RESOLVED_PREFIX + key] = value
        self.session.client.log_batch(self.run_id, params=[Param(k, v) for k, v in fresh.items()])
        self.set_tags({**tags, **_provenance()})

    def log_dataset(self, name: str, uri: str, digest: str) -> None:
        """The split's three parts as the run's inputs, each under the split's digest
        ("digits-train", "digits-validation", "digits-test"): the UI's dataset column
        names them, and the result metrics are linked to the part they were measured on."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            # A file URI matches two registered local sources that behave the same.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        base = name.removesuffix("-train")  # a run's spec names its training part
        inputs = []
        for part, context in DATASET_PARTS.items():
            dataset = MetaDataset(source, name=f"{base}-{part}", digest=digest)._to_mlflow_entity()  # type: ignore[abstract]
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
            self._datasets[part] = (dataset.name, dataset.digest)
        self.session.client.log_inputs(self.run_id, inputs)

    def logged_epochs(self) -> set[int]:
        return self.session.logged_epochs(self.run_id)

    def log_epoch(self, epoch: int, metrics: dict, timestamp: int, *, wait: bool = False) -> None:
        """One request per epoch, never one per step. ``timestamp`` (ms) is the epoch's
        own, the same on every delivery: the server keeps an identical metric once, so
        an epoch sent again after a reply was lost is not doubled."""
        batch = [Metric(k, float(v), timestamp, epoch) for k, v in metrics.items()]
        # A server that is down raises TrackingUnavailable (see watched): the sink keeps
        # the epoch and training goes on; unless ``wait``, without waiting for a restart.
        with contextlib.nullcontext() if wait else impatient():
            self.session.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_final(self, metrics: dict) -> None:
        """The result metrics, kept until the model they describe is logged: MLflow's
        ``log_model`` copies the run's step-0 metrics onto its LoggedModel, without their
        dataset; logged after it, once, they are the run's and the model's, each linked
        to the part of the split it was measured on (the Models tab ranks by them). A run
        whose model fails to log ends FAILED without them."""
        self._final = (dict(metrics), int(1000 * time.time()))

    def _log_final_of(self, model_id: str | None) -> None:
        metrics, ts = self._final
        if metrics:  # a model logged without results (a test's, a benchmark's)
            self._log_linked(metrics, ts, 0, model_id)

    def _log_linked(self, metrics: dict, timestamp: int, step: int, model_id: str | None) -> None:
        """Metrics of the run and of its LoggedModel ``model_id``, each linked to the part of
        the split it was measured on (the Models tab shows and ranks them by that part)."""
        batch = []
        for key, value in metrics.items():
            name, digest = self._datasets.get(measured_on(key) or "", (None, None))
            batch.append(
                Metric(key, float(value), timestamp, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
            )
        self.session.client.log_batch(self.run_id, metrics=batch)

    def log_checkpoint(self, network, example, epoch: int, metrics: dict, timestamp: int) -> str:
        """``network`` at the end of ``epoch`` as a LoggedModel of the run named
        "checkpoint-<epoch>" (``--log-checkpoints``), with the epoch's validation metrics
        linked to it: ordered by val_acc, a run's models put its selected epoch first (ties:
        the earliest, as the selection). ``timestamp`` is the epoch's own (the sink's): the
        run's history, which holds these metrics already, keeps them once. Returns its id."""
        model_id = self._log_as_model(network, example, f"checkpoint-{epoch}", step=epoch)
        self._log_linked({k: metrics[k] for k in CHECKPOINT_METRICS if k in metrics}, timestamp, epoch, model_id)
        return model_id

    def log_model(self, model, example) -> None:
        """The model as an MLflow model (pt2: torch.export, loads without pickle) with a
        signature, and its weights as a plain state dict (loads with weights_only)."""
        model = model.to("cpu").eval()
        self._log_final_of(self._log_as_model(model, example, SELECTED_MODEL, step=0))
        self.log_weights(model.state_dict())

    def _log_as_model(self, model, example, name: str, step: int) -> str:
        """``model`` (on the CPU) as a LoggedModel of the run, output at ``step``: an MLflow
        model (pt2: torch.export, loads without pickle) with its signature. Returns its id.

        Made in the run's experiment and filled through the client's LoggedModel calls, not
        ``mlflow.pytorch.log_model``: that one files a new model under the fluent API's
        experiment (the environment's, else Default), and copies every metric the run has
        at ``step`` onto it (the machine's samples of that number too, without their
        dataset), a request per metric."""
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model, infer_signature

        c = self.session.client
        # Plain layout: torch.export packs channels-last weights with a warning per tensor.
        model = model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            out = model(example).numpy()
        x = example.numpy()
        params = c.get_run(self.run_id).data.params
        # MLflow's own call, for the tags it adds (the user, the source), given the run's experiment.
        logged = watched(
            "create logged model",
            lambda: mlflow.initialize_logged_model(
                name=name, source_run_id=self.run_id, params=params, experiment_id=self.session.experiment_id
            ),
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                card = Model(
                    logged.artifact_location, run_id=self.run_id, model_uuid=logged.model_id, model_id=logged.model_id
                )
                mlflow.pytorch.save_model(
                    model,
                    Path(tmp) / "model",
                    mlflow_model=card,
                    signature=infer_signature(x, out),
                    input_example=x,
                    serialization_format="pt2",
                    pip_requirements=model_requirements(),
                )
                c.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
        except BaseException:
            with contextlib.suppress(Exception):  # the failure itself is what the run ends with
                c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        c.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        return logged.model_id

    def log_weights(self, state_dict: dict) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(WEIGHTS_PATH).name
            torch.save({k: v.cpu() for k, v in state_dict.items()}, path)
            self.log_artifact(path, Path(WEIGHTS_PATH).parent.as_posix())

    def set_tags(self, tags: dict) -> None:
        self.session.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path, folder: str) -> None:
        self.session.client.log_artifact(self.run_id, str(path), folder)

    def log_predictions(self, probs_val, probs_test, labels_val, labels_test, *, pred_val, pred_test) -> None:
        log_predictions_to(
            self.session,
            self.run_id,
            probs_val,
            probs_test,
            labels_val,
            labels_test,
            pred_val=pred_val,
            pred_test=pred_test,
        )

    def end(self, status: str = "FINISHED") -> None:
        stop_system_metrics(self._system)
        self.session.client.set_terminated(self.run_id, status)


def _model_id(run) -> str | None:
    """The id of the LoggedModel a run selected (RunWriter.log_model's), or None for a run
    logged before models were (the registry's source for a version: ``models:/<id>``):
    among the run's outputs, the one at step 0 (a checkpoint is output at its epoch,
    >= 1; the server returns outputs in no particular order)."""
    ids = [o.model_id for o in (run.outputs.model_outputs if run.outputs else []) if not o.step]
    return ids[-1] if ids else None


@functools.cache
def model_requirements() -> list[str]:
    """What a logged model needs to load, pinned to the installed versions that made it
    (importlib.metadata's; a local label such as ``+cpu`` dropped, as MLflow does, so
    that pip can install it); MLflow adds its own pin. Given, so that MLflow does not
    infer them (a subprocess that imports the model's modules)."""
    from importlib import metadata

    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in ("torch", "torchvision")]


def mark_duplicate(session: Session, run_id: str, result_run_id: str) -> None:
    """A run `mlflow run` created for a configuration that already has a result: it only
    points at that result, so neither `compare` nor a results table counts it."""
    c = session.client
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in {schema.DUPLICATE_OF: result_run_id, **_provenance()}.items()])
    c.set_tag(
        run_id, "mlflow.note.content", f"Configuration already finished in run {result_run_id}; nothing was trained."
    )
    c.set_terminated(run_id, "FINISHED")


def fail_run_by_id(run_id: str, reason: str, status: str = "FAILED") -> bool:
    """End a run ``status`` (FAILED, with ``reason`` as a tag; or KILLED), if it is still
    RUNNING. Returns whether it did; False if the server cannot be told."""
    try:
        client = server.client()
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        if status == "FAILED":
            client.set_tag(run_id, schema.FAILURE, one_line(reason, 500))
        client.set_terminated(run_id, status)
        return True
    except (MlflowException, OSError, TrackingUnavailable, TrackingRefused, ConfigError):
        return False  # the server is gone, or the run is not there: nothing can be told


def experiments_with_tag(session: Session, tag: str, limit: int = 20) -> list[str]:
    """Active experiments other than the session's with a FINISHED run carrying ``tag``,
    MLflow's Default experiment first (where a run lands that was started without an
    experiment: the usual reason for results being elsewhere), then the most recent."""
    names = []
    experiments = session.client.search_experiments(max_results=200)
    experiments.sort(key=lambda e: e.experiment_id != DEFAULT_EXPERIMENT_ID)  # stable: the rest keep their order
    for exp in experiments:
        if exp.experiment_id == session.experiment_id:
            continue
        found = session.client.search_runs([exp.experiment_id], f"tags.`{tag}` != ''", max_results=1)
        if found:
            names.append(exp.name)
        if len(names) >= limit:
            break
    return names


def fail_run(session: Session, run_id: str, reason: str) -> None:
    session.client.set_tag(run_id, schema.FAILURE, one_line(reason, 500))
    session.client.set_terminated(run_id, "FAILED")


def set_terminated(session: Session, run_id: str, status: str) -> None:
    session.client.set_terminated(run_id, status)


def download(run_id: str, artifact_path: str) -> str:
    """One of a run's artifacts, as a local file (a transfer: bounded per stall). Read
    from the run's artifact store itself: through ``runs:/``, MLflow turns every failure
    (a network that is down too) into "Failed to download artifacts ... ensure that the
    path is correct"."""
    where = watched("get run", lambda: MlflowClient().get_run(run_id)).info.artifact_uri.rstrip("/")
    return watched(
        "download artifacts",
        lambda: mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{artifact_path}"),
        transfer=True,
    )


def weights_file(run_id: str) -> str:
    """The run's logged state dict, downloaded (read it with weights_only=True)."""
    return download(run_id, WEIGHTS_PATH)


def _version() -> str:
    from .. import __version__  # the installed metadata's, read once in kd_mlflow/__init__.py

    return __version__


PACKAGE = Path(__file__).resolve().parents[1]  # kd_mlflow/, this package's parent


def _provenance() -> dict:
    """What binds a run's numbers to the code that made them: the version, the source
    digest and, in a git checkout of kd-mlflow itself, the commit and whether the
    package's files differ from it."""
    return {schema.VERSION: _version(), schema.SOURCE_DIGEST: _source_digest(), **_git_tag()}


@functools.cache
def _source_digest(package: Path = PACKAGE) -> str:
    """sha256 (16 hex) of the package's own source, kd_mlflow/**/*.py by path and
    content, as airbench keeps its code beside its results: it names the code that ran
    wherever it was installed (a wheel, a Docker image, an edited copy). Once per process."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        content = path.read_bytes()
        h.update(f"{path.relative_to(package).as_posix()}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()[:16]


@functools.cache
def _git_tag(package: Path = PACKAGE) -> dict:
    """The commit, only where the package folder's parent is a repository's top level
    (a clone of kd-mlflow, installed editable or run in place). Installed inside
    another repository (a venv in a project's folder), that repository's commit says
    nothing about this code; a Docker image or a wheel has no repository at all.

    kd.git_dirty covers the package folder only (tracked changes and new files), the
    same files kd.source_digest hashes: what changes a run's numbers. A notebook, a
    local mlflow.db or an edited test elsewhere in the clone does not."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None  # no git on this machine
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != package.resolve().parent:
        return {}
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    if not sha or len(sha) != 40 or status is None:
        return {}
    return {schema.GIT_COMMIT: sha, schema.GIT_DIRTY: "true" if status else "false"}


# --- a study's parent run --------------------------------------------------


def open_study(session: Session, name: str, tags: dict, nested_in: str | None = None) -> str:
    """The parent run: this study's earlier parent (reopened, so a rerun adds to it and
    there is one parent per study), else the one `mlflow run -e main` created, else a
    new one. A run `mlflow run` created for a study that already has a parent only
    points at that parent (kd.duplicate_of), as a duplicate training run does.
    ``nested_in``: the run it is nested under (a study's sweep). Two launches of one
    study at once find or make one parent (:func:`kd_mlflow.tracking.claims.claimed`,
    held while it is found or made)."""
    with claimed(session, tags[schema.CONFIG_HASH], name):
        return _open_study(session, name, tags, nested_in)


def _open_study(session: Session, name: str, tags: dict, nested_in: str | None) -> str:
    c = session.client
    found = [
        r.info.run_id
        for r in session.search(
            f"tags.`{schema.CONFIG_HASH}` = '{tags[schema.CONFIG_HASH]}'", statuses=("FINISHED", *UNFINISHED)
        )
        if r.info.run_id != session.adopted_run_id and schema.DUPLICATE_OF not in r.data.tags
    ]
    if found:
        run_id = found[0]
        c.update_run(run_id, status="RUNNING")
        if session.adopted_run_id:
            mark_duplicate(session, session.adopted_run_id, run_id)
    elif session.adopted_run_id:
        run_id = session.adopted_run_id
        c.set_tag(run_id, "mlflow.runName", name)
    else:
        run_id = c.create_run(session.experiment_id, run_name=name).info.run_id
    nesting = {"mlflow.parentRunId": nested_in} if nested_in else {}
    for key, value in {**tags, **nesting, **_provenance()}.items():
        c.set_tag(run_id, key, value)
    return run_id


def experiment_name(session: Session) -> str:
    return session.client.get_experiment(session.experiment_id).name


def set_tags(session: Session, run_id: str, tags: dict) -> None:
    for key, value in tags.items():
        session.client.set_tag(run_id, key, str(value))


def log_params(session: Session, run_id: str, params: dict) -> None:
    session.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def log_metrics(session: Session, run_id: str, metrics: dict) -> None:
    ts = int(1000 * time.time())
    session.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])


def log_study(
    session: Session, run_id: str, texts: dict, summary: dict, figures: dict, metrics: dict | None = None
) -> None:
    c = session.client
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in _provenance().items()])  # compare's run has no header
    if metrics:
        log_metrics(session, run_id, metrics)
    for name, text in texts.items():
        c.log_text(run_id, text, name)
    if summary:
        c.log_dict(run_id, summary, "steps.json")
    for name, fig in figures.items():
        c.log_figure(run_id, fig, name)


def metric_history(session: Session, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(session.client.get_metric_history(run_id, key), key=lambda m: m.step)]


# --- links a person can open ------------------------------------------------


def ui_base() -> tuple[str, str | None]:
    """(the UI's address, how to start it when it is not a server)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), None
    return "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {uri}"


# MLflow 3's UI opens on its GenAI view unless the link asks for the training one.
_VIEW = "workflowType=machine_learning"


def run_link(session: Session, run_id: str) -> str:
    base, _ = ui_base()
    return f"{base}/#/experiments/{session.experiment_id}/runs/{run_id}?{_VIEW}"


def experiment_link(session: Session) -> str:
    base, _ = ui_base()
    return f"{base}/#/experiments/{session.experiment_id}/runs?{_VIEW}"


def compare_link(session: Session, run_ids) -> str:
    from urllib.parse import quote

    base, _ = ui_base()
    runs = quote(json_list(run_ids))
    exps = quote(json_list([session.experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}&{_VIEW}"


def json_list(values) -> str:
    import json

    return json.dumps([str(v) for v in values], separators=(",", ":"))


# MLflow's UI (3.x) opens the experiment page in the view this tag holds (plus the key)
# for a link with ?viewStateShareKey=KEY (kd_mlflow.view).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."


def share_view(session: Session, key: str, state: str) -> bool:
    """Save a view of the experiment under ``key``; False (said in one line) where it
    cannot be written: the user may only read, or the server is away."""
    try:
        session.client.set_experiment_tag(session.experiment_id, SHARED_VIEW_PREFIX + key, state)
    except (TrackingRefused, TrackingUnavailable, MlflowException) as e:
        print(f"note: the experiment's view was not saved ({one_line(str(e), 200)})", file=sys.stderr)
        return False
    return True


# --- the model registry ---------------------------------------------------------


def register(session: Session, run_id: str, name: str, alias: str | None = None, tags: dict | None = None) -> str:
    """The run's logged model as a version of registered model ``name`` (a run already
    registered there keeps its version: no new one), optionally under ``alias``.
    Returns the version. Two processes registering one run under one name at once make
    one version: the look-up and the creation are one claim's (:func:`kd_mlflow.tracking.claims.claimed`)."""
    c = session.client
    key = hashlib.sha256(f"register\0{name}\0{run_id}".encode()).hexdigest()[:16]
    with claimed(session, key, f"version of {name} for run {run_id}"):
        # A registered model that does not exist yet has no versions ([]); any failure of the
        # search is raised, never read as "not registered yet" (a duplicate version would follow).
        found = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if found:
            version = str(max(int(v.version) for v in found))
        else:
            version = _new_version(session, run_id, name, tags or {})
    if alias:
        c.set_registered_model_alias(name, alias, version)
    for key, value in (tags or {}).items():
        c.set_model_version_tag(name, version, key, value)
    return str(version)


def _new_version(session: Session, run_id: str, name: str, tags: dict) -> str:
    """A version whose source is the run's LoggedModel (``models:/m-...``): MLflow 3 logs
    a model as a LoggedModel, not under the run's artifacts, and registering
    ``runs:/<id>/model`` looks there first and warns that it is not."""
    c = session.client
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = c.get_run(run_id)
    model_id = _model_id(run)
    # A model logged before MLflow 3: under the run's own artifacts.
    source = f"models:/{model_id}" if model_id else f"{run.info.artifact_uri.rstrip('/')}/model"
    return c.create_model_version(
        name, source, run_id=run_id, tags=tags, await_creation_for=60, model_id=model_id
    ).version


# --- predictions ------------------------------------------------------------------


def log_predictions_to(
    session: Session, run_id: str, probs_val, probs_test, labels_val, labels_test, *, pred_val, pred_test
) -> None:
    from .. import predictions

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(schema.PREDICTIONS_PATH).name
        predictions.save(path, probs_val, probs_test, labels_val, labels_test, pred_val=pred_val, pred_test=pred_test)
        session.client.log_artifact(run_id, str(path), Path(schema.PREDICTIONS_PATH).parent.as_posix())
    session.client.set_tag(run_id, schema.PREDICTIONS, schema.PREDICTIONS_PATH)


def load_predictions(run_id: str):
    """The run's predictions artifact, read (a download as :func:`download` does it:
    bounded, voiced, its failure the network's, in one line)."""
    from .. import predictions

    return predictions.load(download(run_id, schema.PREDICTIONS_PATH))


# --- checkpoints that travel with their run ----------------------------------------

CHECKPOINT_FOLDER = "checkpoint"


@dataclass(frozen=True)
class ServerCheckpoints:
    """A run's resumable checkpoints as its artifacts, ``checkpoint/<name>``: what a
    rerun on another machine continues from (:class:`kd_mlflow.checkpoint.CheckpointStore`
    decides what to put there and when)."""

    session: Session

    def upload(self, run_id: str, path: Path, name: str) -> None:
        """``path`` as ``checkpoint/<name>``, replacing one of that name (the artifact
        store's put). Without waiting for a restarting server: the local copy keeps the
        state and training goes on."""
        with tempfile.TemporaryDirectory() as tmp, impatient():
            named = Path(tmp) / name
            shutil.copyfile(path, named)
            self.session.client.log_artifact(run_id, str(named), CHECKPOINT_FOLDER)

    def download(self, run_id: str) -> list[Path]:
        """The run's checkpoints, each downloaded as :func:`download` does it; [] if none."""
        names = self.session.artifact_paths(run_id, CHECKPOINT_FOLDER)
        return [Path(download(run_id, name)) for name in sorted(names)]

    def delete(self, run_id: str) -> None:
        """The run's checkpoints gone from its artifact store (its result is logged)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        where = self.session.client.get_run(run_id).info.artifact_uri
        watched("delete artifacts", lambda: get_artifact_repository(where).delete_artifacts(CHECKPOINT_FOLDER))
