"""One composition function per command: check inputs, load data, then talk to MLflow.

Everything that can be refused is refused before a run is created. A configuration
that already has a FINISHED run is reused, not retrained; an unfinished one resumes
from its local checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod
from . import models, schema, tracking
from .checkpoint import CheckpointStore
from .config import ConfigError, Recipe, recipe_from_params, resolve
from .ensemble import Ensemble
from .errors import Interrupted, TrackingUnavailable
from .objectives import CachedTeacher, CrossEntropy, Distillation, OnlineTeacher, teacher_table
from .train import evaluate, fit, make_runtime


@dataclass(frozen=True)
class Execution:
    """How to run, not what: none of this changes a result's identity."""
    device: str = "auto"
    compile: bool = False
    deterministic: bool = False
    force: bool = False
    cache_dir: Path | None = None


@dataclass
class Outcome:
    run_id: str
    reused: bool
    metrics: dict = field(default_factory=dict)


# --- train -------------------------------------------------------------------

def train(seed: int, recipe: Recipe, preset: str, data_dir: str | None = None,
          experiment: str | None = None, ex: Execution = Execution(),
          parent_run_id: str | None = None, session=None) -> Outcome:
    _check_seed(seed)
    source, split = _load(recipe, data_dir, ex)
    job = _Job(name=f"train-seed-{seed}", seed=seed, recipe=recipe, preset=preset,
               source=source, split=split, tags={schema.ROLE: "train"},
               objective=lambda dd, rt: CrossEntropy())
    return _train_or_reuse(session or tracking.connect(experiment), job, ex, parent_run_id)


# --- distill -----------------------------------------------------------------

def distill(teacher_run_id: str, seed: int, preset: str | None = None, overrides: dict | None = None,
            data_dir: str | None = None, experiment: str | None = None,
            ex: Execution = Execution(), parent_run_id: str | None = None, session=None) -> Outcome:
    """A student of a train run (SD), an ensemble run (KD) or another student."""
    _check_seed(seed)
    session = session or tracking.connect(experiment)
    teacher = _finished(session, teacher_run_id, "teacher")
    t_tags, t_params = teacher.data.tags, teacher.data.params
    role = t_tags.get(schema.ROLE)
    if role not in schema.ROLES:
        raise ConfigError("teacher", teacher_run_id, "not a kd-mlflow train, ensemble or student run")
    preset = preset or t_tags[schema.PRESET]
    recipe = _student_recipe(preset, t_params, overrides or {})
    source, split = _load(recipe, data_dir or t_params.get("data_dir") or None, ex)
    _check_same_data(teacher, split, source, "teacher")
    method = "kd" if role == "ensemble" else "sd"
    t_seeds = t_tags.get(schema.MEMBER_SEEDS) or t_tags.get(schema.SEED, "")
    name = f"kd-seed-{seed}" if method == "kd" else f"sd-t{t_seeds}-s{seed}"
    generation = int(t_tags.get(schema.GENERATION, "0")) + 1
    _teacher_weights_check(session, teacher)

    def objective(dd, rt):
        model = rt.prepare(teacher_model)
        if recipe.augment:
            t = OnlineTeacher(model, rt.autocast)
        else:
            t = CachedTeacher(teacher_table(model, dd, rt.autocast, recipe.eval_batch_size))
        return Distillation(t, recipe.temperature, recipe.alpha)

    job = _Job(name=name, seed=seed, recipe=recipe, preset=preset, source=source, split=split,
               objective=objective, identity=(teacher_run_id,),
               tags={schema.ROLE: "student", schema.METHOD: method,
                     schema.TEACHER_RUN_ID: teacher_run_id, schema.TEACHER_ROLE: role,
                     schema.TEACHER_SEEDS: t_seeds, schema.GENERATION: str(generation)})
    existing = None if ex.force else session.find_result(job.config_hash)
    if existing:
        return _reuse(session, existing)
    # Load (and so vet) the teacher before any run exists: a refused file creates nothing.
    teacher_model = _load_teacher(session, teacher, source.num_classes)
    return _train_or_reuse(session, job, ex, parent_run_id)


def _student_recipe(preset: str, teacher_params: dict, overrides: dict) -> Recipe:
    # Distillation must see the teacher's data: its dataset, split and subset.
    same_data = {k: type(getattr(Recipe, k))(teacher_params[k])
                 for k in ("dataset", "val_size", "train_subset", "split_seed") if k in teacher_params}
    return resolve(preset, **{**same_data, **overrides})


# --- ensemble ----------------------------------------------------------------

def ensemble(member_run_ids: list[str], combine: str = "prob", data_dir: str | None = None,
             experiment: str | None = None, ex: Execution = Execution(),
             parent_run_id: str | None = None, session=None) -> Outcome:
    if len(member_run_ids) < 2 or len(set(member_run_ids)) != len(member_run_ids):
        raise ConfigError("members", ",".join(member_run_ids), "need at least two distinct runs")
    session = session or tracking.connect(experiment)
    members = [_finished(session, rid, "members") for rid in member_run_ids]
    for m in members:
        if m.data.tags.get(schema.ROLE) not in ("train", "student"):
            raise ConfigError("members", m.info.run_id, "not a train or student run")
        _teacher_weights_check(session, m, "members")
    first = members[0]
    recipe = recipe_from_params(first.data.params)
    source, split = _load(recipe, data_dir or first.data.params.get("data_dir") or None, ex)
    for m in members:
        _check_same_data(m, split, source, "members")
    seeds = [m.data.tags.get(schema.SEED, "?") for m in members]
    roles = {m.data.tags[schema.ROLE] for m in members}
    config_hash = _digest("ensemble", combine, *sorted(member_run_ids))
    existing = None if ex.force else session.find_result(config_hash)
    if existing:
        return _reuse(session, existing)

    rt = make_runtime(recipe, ex.device, deterministic=ex.deterministic)
    model = rt.prepare(Ensemble([_load_teacher(session, m, source.num_classes, "members") for m in members],
                                combine))
    dd = data_mod.DeviceData(source, split, rt.device)
    val_loss, val_acc = evaluate(model, dd, "val", recipe, rt)
    _, test_acc = evaluate(model, dd, "test", recipe, rt)
    name = ("sd-" if roles == {"student"} else "") + f"ensemble-seeds-{_seed_label(seeds)}"
    writer = tracking.RunWriter(session, None, name, parent_run_id)
    with _finishing(writer):
        params = {"combine": combine, "n_members": len(members), "data_dir": source.location,
                  "dataset": recipe.dataset, **_data_params(source, split)}
        writer.log_header(params, {
            schema.ROLE: "ensemble", schema.PRESET: first.data.tags.get(schema.PRESET, ""),
            schema.DATASET: recipe.dataset, schema.SPLIT_DIGEST: split.digest,
            schema.NUM_CLASSES: str(source.num_classes), schema.CONFIG_HASH: config_hash,
            schema.MEMBER_RUN_IDS: ",".join(member_run_ids), schema.MEMBER_SEEDS: ",".join(seeds),
            schema.MEMBER_ROLE: roles.pop() if len(roles) == 1 else "mixed",
            schema.GENERATION: str(max(int(m.data.tags.get(schema.GENERATION, "0")) for m in members))})
        writer.log_dataset(f"{recipe.dataset}-train", source.uri, split.digest)
        final = {schema.FINAL_VAL_ACC: val_acc, schema.FINAL_TEST_ACC: test_acc, "val_loss": val_loss}
        for i, m in enumerate(members):
            final[f"member_{i}_val_acc"] = m.data.metrics.get(schema.FINAL_VAL_ACC, float("nan"))
            final[f"member_{i}_test_acc"] = m.data.metrics.get(schema.FINAL_TEST_ACC, float("nan"))
        writer.log_final(final)
        writer.log_model(model, dd.test_x[:2].cpu())
    print(f"ensemble of {len(members)}: val_acc {val_acc:.2f}  test_acc {test_acc:.2f}", file=sys.stderr)
    return Outcome(writer.run_id, False, {"val_acc": val_acc, "test_acc": test_acc})


def train_runs_for_seeds(session, seeds: list[int], preset: str | None, dataset: str | None) -> list[str]:
    """The newest FINISHED train run per seed (optionally of one preset and dataset)."""
    found: dict[int, object] = {}
    for run in session.search(f"tags.`{schema.ROLE}` = 'train'"):
        t = run.data.tags
        if schema.DUPLICATE_OF in t or (preset and t.get(schema.PRESET) != preset) or \
                (dataset and t.get(schema.DATASET) != dataset):
            continue
        found.setdefault(int(t.get(schema.SEED, -1)), run)  # newest first
    for seed in seeds:
        if seed not in found:
            raise ConfigError("seeds", seed, "no FINISHED train run with this seed")
    runs = [found[s] for s in seeds]
    presets = {(r.data.tags.get(schema.PRESET), r.data.tags.get(schema.DATASET)) for r in runs}
    if len(presets) > 1:
        raise ConfigError("seeds", ",".join(map(str, seeds)),
                          f"runs of several presets/datasets {sorted(presets)}: pass --preset/--dataset")
    return [r.info.run_id for r in runs]


# --- the shared training path ------------------------------------------------

@dataclass
class _Job:
    name: str
    seed: int
    recipe: Recipe
    preset: str
    source: data_mod.Source
    split: data_mod.Split
    tags: dict
    objective: Callable            # (DeviceData, Runtime) -> objective
    identity: tuple = ()           # what else, beyond recipe/data/seed, makes the result

    @property
    def config_hash(self) -> str:
        return _digest(self.tags[schema.ROLE], self.recipe.digest(), self.split.digest,
                       str(self.seed), *self.identity)


def _train_or_reuse(session, job: _Job, ex: Execution, parent_run_id) -> Outcome:
    if not ex.force:
        existing = session.find_result(job.config_hash)
        if existing:
            return _reuse(session, existing)
    store = CheckpointStore(_checkpoint_dir(session, job.config_hash, ex))
    with _exclusive(store.directory):
        # Another process may have finished it while we waited for the lock.
        existing = None if ex.force else session.find_result(job.config_hash)
        if existing:
            return _reuse(session, existing)
        if ex.force:
            store.clear()
        return _train(session, job, ex, store, parent_run_id)


def _train(session, job: _Job, ex: Execution, store: CheckpointStore, parent_run_id) -> Outcome:
    resumable = session.find_resumable(job.config_hash)
    run_id = resumable.info.run_id if resumable else None
    writer = tracking.RunWriter(session, run_id, job.name, parent_run_id)
    print(f"run {writer.run_id} ({job.name})", file=sys.stderr)
    with _finishing(writer):
        recipe, source, split = job.recipe, job.source, job.split
        params = {**recipe.as_params(), "seed": job.seed, "preset": job.preset,
                  "data_dir": source.location, **_data_params(source, split)}
        writer.log_header(params, {
            **job.tags, schema.PRESET: job.preset, schema.DATASET: recipe.dataset,
            schema.SPLIT_DIGEST: split.digest, schema.NUM_CLASSES: str(source.num_classes),
            schema.SEED: str(job.seed), schema.CONFIG_HASH: job.config_hash})
        writer.log_dataset(f"{recipe.dataset}-train", source.uri, split.digest)
        rt = make_runtime(recipe, ex.device, ex.compile, ex.deterministic)
        writer.set_tags({"kd.device": str(rt.device), "kd.precision_resolved": rt.precision,
                         "kd.threads": str(torch.get_num_threads())})
        torch.manual_seed(job.seed)  # the model seed sets the initialisation, nothing else
        model = rt.prepare(models.build(recipe, source.num_classes))
        dd = data_mod.DeviceData(source, split, rt.device)
        sink = EpochSink(writer)
        result = fit(model, job.objective(dd, rt), dd, recipe, rt, sink, store)
        sink.replay(result.history)
        sink.flush()
        model.load_state_dict(result.best_state)
        final = {schema.FINAL_VAL_ACC: result.best_val_acc, schema.FINAL_TEST_ACC: result.best_test_acc,
                 schema.BEST_EPOCH: result.best_epoch}
        writer.log_final(final)
        writer.log_model(model, dd.test_x[:2].cpu())
    store.clear()
    return Outcome(writer.run_id, False, final)


class EpochSink:
    """Delivers each epoch's metrics exactly once, in one request per epoch. If the
    server is unreachable, training goes on and the epochs wait here (and in the
    checkpoint's history) until it answers again."""

    def __init__(self, writer):
        self.writer = writer
        self.delivered = writer.logged_epochs()
        self.pending: dict[int, dict] = {}

    def __call__(self, epoch: int, metrics: dict) -> None:
        if epoch not in self.delivered:
            self.pending[epoch] = metrics
        self._try_deliver()

    def replay(self, history: list[dict]) -> None:
        """Epochs from a resumed checkpoint that the run has not seen yet."""
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in self.delivered:
                self.pending.setdefault(epoch, metrics)

    def _try_deliver(self) -> bool:
        for epoch in sorted(self.pending):
            try:
                self.writer.log_epoch(epoch, self.pending[epoch])
            except TrackingUnavailable as e:
                print(f"warning: tracking server unreachable, metrics kept locally ({e})",
                      file=sys.stderr)
                return False
            self.delivered.add(epoch)
            del self.pending[epoch]
        return True

    def flush(self) -> None:
        if not self._try_deliver():
            raise TrackingUnavailable(
                f"{len(self.pending)} epoch(s) of metrics could not be delivered; "
                "the checkpoint is kept: run the same command again to upload them")


def _reuse(session, run) -> Outcome:
    rid = run.info.run_id
    if session.adopted_run_id and session.adopted_run_id != rid:
        tracking.mark_duplicate(session, session.adopted_run_id, rid)
    print(f"reusing finished run {rid} ({run.data.tags.get('mlflow.runName', '')})", file=sys.stderr)
    m = run.data.metrics
    return Outcome(rid, True, {k: m[k] for k in (schema.FINAL_VAL_ACC, schema.FINAL_TEST_ACC) if k in m})


@contextlib.contextmanager
def _finishing(writer):
    """End the run FINISHED, KILLED on a signal, FAILED on an error; never RUNNING
    (unless the server itself is gone, in which case it cannot be told)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Interrupted(signum)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        writer.end("KILLED")
        raise
    except TrackingUnavailable:
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            writer.end("FAILED")
        raise
    else:
        writer.end("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _exclusive(directory: Path):
    """One trainer per configuration on this machine: a second launch waits, then
    finds the first one's result."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another process is training this configuration; waiting for it", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --- helpers -----------------------------------------------------------------

def _load(recipe: Recipe, data_dir, ex: Execution):
    source = data_mod.load(recipe.dataset, data_dir, ex.cache_dir)
    return source, data_mod.make_split(source, recipe)


def _data_params(source, split) -> dict:
    return {"num_classes": source.num_classes, "split_digest": split.digest,
            "n_train": len(split.train_idx), "n_val": len(split.val_idx), "n_test": len(source.test_y)}


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("seed", seed, "must be an integer >= 0")


def _finished(session, run_id: str, option: str):
    run = session.get_run(run_id, option)
    if run.info.status != "FINISHED":
        raise ConfigError(option, run_id, f"run is {run.info.status}, not FINISHED")
    if schema.DUPLICATE_OF in run.data.tags:
        raise ConfigError(option, run_id, f"run only points at {run.data.tags[schema.DUPLICATE_OF]}")
    return run


def _check_same_data(run, split, source, option: str) -> None:
    tags = run.data.tags
    if tags.get(schema.SPLIT_DIGEST) != split.digest:
        raise ConfigError(option, run.info.run_id,
                          f"different dataset or split (digest {tags.get(schema.SPLIT_DIGEST)} != {split.digest})")
    if tags.get(schema.NUM_CLASSES) != str(source.num_classes):
        raise ConfigError(option, run.info.run_id, "different number of classes")


def _teacher_weights_check(session, run, option: str = "teacher") -> None:
    names = {f.path for f in session.client.list_artifacts(run.info.run_id, "weights")}
    if tracking.WEIGHTS_PATH not in names:
        raise ConfigError(option, run.info.run_id, "run has no model weights")


def _load_teacher(session, run, num_classes: int, option: str = "teacher") -> torch.nn.Module:
    """Rebuild a train/student run's network, or an ensemble of them, on the CPU from
    weights that load without pickle."""
    tags = run.data.tags
    if tags.get(schema.ROLE) == "ensemble":
        members = [session.get_run(rid, "teacher") for rid in tags[schema.MEMBER_RUN_IDS].split(",")]
        combine = run.data.params.get("combine", "prob")
        return Ensemble([_load_teacher(session, m, num_classes, option) for m in members], combine).eval()
    model = models.build(recipe_from_params(run.data.params), num_classes)
    try:
        model.load_state_dict(tracking.load_weights(run.info.run_id))
    except Exception as e:  # a planted pickle or foreign file is refused here
        raise ConfigError(option, run.info.run_id, f"weights refused: {type(e).__name__}") from None
    return model.eval()


def _checkpoint_dir(session, config_hash: str, ex: Execution) -> Path:
    where = _digest(tracking.tracking_uri(), session.experiment_id, config_hash)
    return Path(ex.cache_dir or data_mod.default_cache_dir()) / "checkpoints" / where


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _seed_label(seeds: list[str]) -> str:
    try:
        ints = sorted(int(s) for s in seeds)
    except ValueError:
        return "_".join(seeds)
    if ints == list(range(ints[0], ints[-1] + 1)):
        return f"{ints[0]}-{ints[-1]}"
    return "_".join(map(str, ints))
