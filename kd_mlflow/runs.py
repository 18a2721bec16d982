"""A run's life, in one place: find a result or a resumable run by its configuration
hash, reuse it, mark duplicates, deliver the epochs' metrics, finish the run, and the one
path every role (train, student, ensemble) records its run through.

With :mod:`kd_mlflow.tracking` (the MLflow adapter), this is the only module that sees
MLflow entities or tag names: everything else gets plain :class:`RunRecord` values.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

from . import schema, tracking
from .config import ConfigError, Recipe, recipe_from_params
from .errors import Interrupted, TrackingRefused, TrackingUnavailable, cause, note_done
from .tracking import claims, server

# --- plain records ---------------------------------------------------------


def _int(text, default=None):
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _ids(text) -> tuple:
    """Comma-separated ids or seeds, each stripped: equal lists compare equal however
    they were typed ("0, 1,2" and "0,1,2")."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


@dataclass(frozen=True)
class RunRecord:
    """What kd-mlflow needs to know of a logged run, without MLflow's types."""

    run_id: str
    name: str = ""
    status: str = "FINISHED"
    role: str | None = None
    seed: int | None = None
    preset: str | None = None
    dataset: str | None = None
    split_digest: str | None = None
    num_classes: int | None = None
    config_hash: str | None = None
    group: str | None = None
    group_label: str | None = None
    method: str | None = None  # students: kd | sd
    teacher_run_id: str | None = None
    teacher_seeds: str = ""
    teacher_model: str | None = None  # students: the teacher's architecture(s), kd.teacher_model
    generation: int = 0
    member_run_ids: tuple = ()
    member_seeds: tuple = ()
    member_role: str | None = None
    combine: str | None = None  # ensembles: prob | logit
    duplicate_of: str | None = None
    study: bool = False  # a study's parent run, not a result
    mixed: bool = False  # an ensemble of members of different groups (--allow-mixed)
    start_time: int = 0  # ms since the epoch: of two runs of one configuration, the later wins
    has_calibration: bool = False  # its test_nll, test_ece and test_brier are logged
    params: dict = field(default_factory=dict)  # as the run used them (see record_of)
    final_val_acc: float | None = None
    final_test_acc: float | None = None
    has_predictions: bool = False
    sweep_kd_choice: str | None = None  # a KD student a study's sweep chose: the choice, in words

    @property
    def data_dir(self) -> str | None:
        return self.params.get("data_dir") or None

    @property
    def recipe(self) -> Recipe:
        """The recipe its params make; ConfigError if they make none."""
        return recipe_from_params(self.params)


def _params(logged: dict) -> dict:
    """The params as the run used them: where `mlflow run` had logged a value in
    another form or value, the one used is under "resolved.<name>"."""
    n = len(schema.RESOLVED_PREFIX)
    resolved = {k[n:]: v for k, v in logged.items() if k.startswith(schema.RESOLVED_PREFIX)}
    return {**{k: v for k, v in logged.items() if not k.startswith(schema.RESOLVED_PREFIX)}, **resolved}


def record_of(run) -> RunRecord:
    """The one reading of a logged run's params, tags and results."""
    t, p, m = run.data.tags, _params(run.data.params), run.data.metrics
    role = t.get(schema.ROLE)
    return RunRecord(
        run_id=run.info.run_id,
        name=t.get("mlflow.runName", ""),
        status=run.info.status,
        role=role,
        seed=_int(t.get(schema.SEED), _int(p.get("seed"))),
        preset=t.get(schema.PRESET),
        dataset=t.get(schema.DATASET),
        split_digest=t.get(schema.SPLIT_DIGEST),
        num_classes=_int(t.get(schema.NUM_CLASSES)),
        config_hash=t.get(schema.CONFIG_HASH),
        group=t.get(schema.GROUP),
        group_label=t.get(schema.GROUP_LABEL),
        method=t.get(schema.METHOD),
        teacher_run_id=t.get(schema.TEACHER_RUN_ID),
        teacher_seeds=",".join(_ids(t.get(schema.TEACHER_SEEDS))),
        teacher_model=t.get(schema.TEACHER_MODEL) or None,
        generation=_int(t.get(schema.GENERATION), 0),
        member_run_ids=_ids(t.get(schema.MEMBER_RUN_IDS)),
        member_seeds=_ids(t.get(schema.MEMBER_SEEDS)),
        member_role=t.get(schema.MEMBER_ROLE),
        combine=p.get("combine"),
        duplicate_of=t.get(schema.DUPLICATE_OF),
        study=schema.STUDY in t,
        mixed=t.get(schema.MIXED) == "true",
        start_time=run.info.start_time or 0,
        has_calibration=all(k in m for k in schema.CALIBRATION_METRICS),
        params=p,
        final_val_acc=m.get(schema.FINAL_VAL_ACC),
        final_test_acc=m.get(schema.FINAL_TEST_ACC),
        has_predictions=schema.PREDICTIONS in t,
        sweep_kd_choice=t.get(schema.SWEEP_KD_CHOICE),
    )


def records_frame(records) -> pd.DataFrame:
    """compare's input: one row per record, a column per RunRecord field (plain names),
    and ``recipe``: the record's Recipe, or None where its params make none."""
    names = [f.name for f in fields(RunRecord)]
    rows = [[getattr(r, n) for n in names] + [_recipe_or_none(r)] for r in records]
    return pd.DataFrame(rows, columns=[*names, "recipe"])


def _recipe_or_none(rec: RunRecord) -> Recipe | None:
    try:
        return rec.recipe
    except ConfigError:
        return None


# --- lookups ---------------------------------------------------------------


def get(session, run_id: str, option: str) -> RunRecord:
    return record_of(session.get_run(run_id, option))


def finished(session, run_id: str, option: str) -> RunRecord:
    """A FINISHED result run, or a one-line refusal naming ``option``."""
    rec = get(session, run_id, option)
    if rec.status != "FINISHED":
        raise ConfigError(option, run_id, f"run is {rec.status}, not FINISHED")
    if rec.duplicate_of:
        raise ConfigError(option, run_id, f"run only points at {rec.duplicate_of}")
    if rec.role not in schema.ROLES:
        raise ConfigError(option, run_id, "not a kd-mlflow train, ensemble, student or joint run")
    return rec


def find_result(session, config_hash: str) -> RunRecord | None:
    """The newest FINISHED run that holds this configuration's result."""
    for run in session.search(f"tags.`{schema.CONFIG_HASH}` = '{config_hash}'"):
        if schema.DUPLICATE_OF not in run.data.tags:
            return record_of(run)
    return None


def result_for(session, spec: RunSpec) -> RunRecord | None:
    """The FINISHED run that holds ``spec``'s result, once its logged recipe is shown to
    be the one ``spec`` asks for: a run is never reused on its hash alone."""
    found = find_result(session, spec.config_hash)
    if found is not None and spec.recipe is not None:
        logged = found.recipe
        for name, wanted in spec.recipe.differences(logged, spec.recipe_role).items():
            raise ConfigError(
                name,
                wanted,
                f"run {found.run_id} ({found.name}) has this configuration's hash but logged "
                f"{name}={found.params.get(name, getattr(logged, name))!r}: not reused; --force trains anew",
            )
    return found


def find_resumable(session, config_hash: str) -> RunRecord | None:
    runs = session.search(f"tags.`{schema.CONFIG_HASH}` = '{config_hash}'", statuses=tracking.UNFINISHED)
    return record_of(runs[0]) if runs else None


def train_runs_for_seeds(session, seeds: list[int], preset: str | None, dataset: str | None) -> list[RunRecord]:
    """The newest FINISHED train run per seed, all of one group (one recipe, one split):
    the group that has every seed; if several do, the preset's own recipe (no overrides),
    else the group of the newest run; optionally of one preset and dataset."""
    groups: dict[tuple, dict[int, RunRecord]] = {}
    everywhere: dict[str, set] = {}  # group label -> seeds, whatever the filters: what to say if none fits
    for run in session.search(f"tags.`{schema.ROLE}` = 'train'"):  # newest first
        rec = record_of(run)
        if rec.duplicate_of:
            continue
        everywhere.setdefault(f"{rec.group_label or rec.preset} ({rec.dataset})", set()).add(rec.seed)
        if (preset and rec.preset != preset) or (dataset and rec.dataset != dataset):
            continue
        key = (rec.preset, rec.dataset, rec.group)
        groups.setdefault(key, {}).setdefault(rec.seed if rec.seed is not None else -1, rec)
    complete = {k: v for k, v in groups.items() if all(s in v for s in seeds)}
    if not complete:
        wanted = ",".join(map(str, seeds))
        kind = " ".join(x for x in (preset, dataset, "train run") if x)
        where = f"in experiment {tracking.experiment_name(session)!r}"
        there = "; ".join(
            f"{label}: seeds {','.join(str(s) for s in sorted(x for x in found if x is not None))}"
            for label, found in list(everywhere.items())[:6]
        )
        there = f"; train runs there: {there}" if there else "; it has no FINISHED train runs"
        missing = sorted({s for s in seeds if not any(s in v for v in groups.values())})
        if missing:
            raise ConfigError("seeds", wanted, f"no FINISHED {kind} with seed {missing[0]} {where}{there}")
        raise ConfigError(
            "seeds", wanted, f"no one recipe has a FINISHED train run for every seed {where}{there}: pass --members"
        )
    plain = [k for k, v in complete.items() if v[seeds[0]].group_label in (None, k[0])]
    key = plain[0] if len(plain) == 1 else next(iter(complete))  # dicts keep search order
    if len(complete) > 1 and len(plain) != 1:
        print(
            f"note: several recipes have runs for these seeds; taking {complete[key][seeds[0]].group_label}"
            " (the newest); pass --members to choose",
            file=sys.stderr,
        )
    return [complete[key][s] for s in seeds]


def members(session, rec: RunRecord) -> list[RunRecord]:
    return [get(session, rid, "members") for rid in rec.member_run_ids]


def check_same_data(rec: RunRecord, split_digest: str, num_classes: int, option: str) -> None:
    if rec.split_digest != split_digest:
        raise ConfigError(
            option, rec.run_id, f"different dataset or split (digest {rec.split_digest} != {split_digest})"
        )
    if rec.num_classes != num_classes:
        raise ConfigError(option, rec.run_id, "different number of classes")


def check_weights(session, rec: RunRecord, option: str) -> None:
    if tracking.WEIGHTS_PATH not in session.artifact_paths(rec.run_id, "weights"):
        raise ConfigError(option, rec.run_id, "run has no model weights")


def load_weights(rec: RunRecord, option: str) -> dict:
    """A run's weights, read with weights_only=True: a planted pickle is refused."""
    import pickle

    import torch

    path = tracking.weights_file(rec.run_id)  # the network's failures are the network's (exit 1)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:  # only the file's contents: a planted
        # pickle or a foreign file
        raise ConfigError(option, rec.run_id, f"weights refused: {type(e).__name__}") from None


def metric_histories(session, run_ids: dict, keys=("train_loss", "val_acc")) -> dict:
    """{name: {key: [(epoch, value), ...]}} for the named runs."""
    return {name: {k: tracking.metric_history(session, rid, k) for k in keys} for name, rid in run_ids.items()}


def experiments_with_results(session) -> list[str]:
    """Names of other experiments that hold kd-mlflow results."""
    return tracking.experiments_with_tag(session, schema.ROLE)


UNFINISHED = ("RUNNING", "FAILED", "KILLED")  # compare names these, one line each
_ENTRY_POINT = "mlflow.project.entryPoint"
_PARENT = "mlflow.parentRunId"


def results_frame(session, preset: str | None = None) -> pd.DataFrame:
    """Every run of the experiment (of one preset, filtered on the server) that is
    FINISHED, RUNNING, FAILED or KILLED, in one search query, read as RunRecords:
    compare's input (:func:`records_frame`). Beside the records' fields, ``last_seen``
    (ms: the run's latest metric, else its start) and ``end_time`` (ms, 0 while it runs),
    so that compare can say how long a run not finished has been silent; ``parent_run_id``
    and ``sweep`` (a sweep's parent run), so that it can gather a sweep's students."""
    where = f"tags.`{schema.PRESET}` = '{preset}'" if preset else ""
    found = session.search(where, statuses=("FINISHED", *UNFINISHED), max_results=50_000)
    # A compare run under `mlflow run -e compare` is RUNNING while it reads: not a result.
    found = [r for r in found if r.info.status == "FINISHED" or r.data.tags.get(_ENTRY_POINT) != "compare"]
    frame = records_frame(record_of(run) for run in found)
    # The latest metric's timestamp: MLflow's search returns each metric's last value
    # with its timestamp (RunData keeps the Metric objects; it has no public accessor).
    last = [max([m.timestamp for m in getattr(r.data, "_metric_objs", ())] + [r.info.start_time or 0]) for r in found]
    return frame.assign(
        last_seen=last,
        end_time=[r.info.end_time or 0 for r in found],
        # A sweep's students are nested under its parent: compare reports them as one table.
        parent_run_id=[r.data.tags.get(_PARENT) for r in found],
        sweep=[schema.SWEEP in r.data.tags for r in found],
    )


def register(session, run_id: str, name: str, alias: str | None = None, tags: dict | None = None) -> str:
    """The run's model as a version of ``name`` in the Model Registry (once per run)."""
    version = tracking.register(session, run_id, name, alias, tags)
    print(f"registered model {name} version {version}" + (f" (alias {alias})" if alias else ""), file=sys.stderr)
    return version


def predictions_of(session, rec: RunRecord):
    """The run's logged predictions (kd_mlflow.predictions.Predictions), or None."""
    if not rec.has_predictions:
        return None
    return tracking.load_predictions(rec.run_id)


def add_predictions(
    session, rec: RunRecord, probs_val, probs_test, labels_val, labels_test, *, pred_val, pred_test
) -> None:
    """Predictions computed after the fact (a run made before runs logged them): logged
    once, on the run itself."""
    tracking.log_predictions_to(
        session, rec.run_id, probs_val, probs_test, labels_val, labels_test, pred_val=pred_val, pred_test=pred_test
    )


def add_calibration(session, rec: RunRecord, metrics: dict) -> None:
    """Calibration computed after the fact from a run's predictions (a run made before
    runs logged it): logged once, on the run itself."""
    tracking.log_metrics(session, rec.run_id, metrics)


def log_tables(session, run_id: str, texts: dict, figures: dict) -> None:
    """Tables and plots as artifacts of a run that is not a result (compare's own)."""
    tracking.log_study(session, run_id, texts, {}, figures)
    tracking.set_tags(session, run_id, {schema.COMPARE: "true"})


# --- outcomes --------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a step hands back: as JSON on stdout when it ran as a process."""

    run_id: str
    name: str
    reused: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        d = json.loads(text)
        return cls(d["run_id"], d["name"], bool(d["reused"]))


def reuse(session, rec: RunRecord, log=sys.stderr) -> Outcome:
    """A configuration that already has a result is not run again. A run that
    `mlflow run` made for it only points at that result."""
    if session.adopted_run_id and session.adopted_run_id != rec.run_id:
        tracking.mark_duplicate(session, session.adopted_run_id, rec.run_id)
    print(f"reusing finished run {rec.run_id} ({rec.name})", file=log)
    return Outcome(rec.run_id, rec.name, True)


# --- recording a run -------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that names and identifies a run before it exists."""

    name: str
    config_hash: str
    params: dict  # logged whole, once
    tags: dict  # kd.* identity and lineage
    dataset: tuple  # (name, uri, digest) of the run's input
    recipe: Recipe | None = None  # what the run trains with: checked against a run it would reuse
    recipe_role: str = "train"  # whose fields of the recipe are its identity


@dataclass
class Final:
    """What a finished body hands back: the result metrics and the model to log."""

    metrics: dict
    model: object
    example: object  # a few raw inputs, for the model's signature


class Recording:
    """The run being written, as the body of :func:`record` sees it."""

    def __init__(self, writer):
        self.writer = writer
        self.sink = EpochSink(writer)

    @property
    def run_id(self) -> str:
        return self.writer.run_id

    def set_tags(self, tags: dict) -> None:
        self.writer.set_tags({k: str(v) for k, v in tags.items()})

    def sink_for(self, model, example, index: int = 0, like=None):
        """What ``fit`` delivers network ``index`` of ``model``'s epochs to: :attr:`sink`, or
        with ``--log-checkpoints`` a :class:`CheckpointSink` around it. ``like``: the
        network's lone form (a packed wave's), else ``model`` itself."""
        every = log_checkpoints_every()
        return CheckpointSink(self.sink, every, model, index, like or model, example) if every else self.sink

    def log_predictions(self, probs_val, probs_test, labels_val, labels_test, *, pred_val, pred_test) -> None:
        """The selected model's probabilities and predicted classes on the validation and
        test images, as an artifact that loads without pickle (:mod:`kd_mlflow.predictions`)."""
        self.writer.log_predictions(
            probs_val, probs_test, labels_val, labels_test, pred_val=pred_val, pred_test=pred_test
        )


def _store(session, key: str, checkpoint_root: Path):
    """The checkpoints of the training ``key`` names: on local disk under
    ``checkpoint_root``, copied to the run's artifacts ($KD_MLFLOW_CHECKPOINT_EVERY)."""
    from .checkpoint import CheckpointStore, cadence  # torch: loaded only by what trains

    every = cadence()
    return CheckpointStore(
        _checkpoint_dir(session, key, checkpoint_root), remote=tracking.ServerCheckpoints(session), every=every
    )


@contextlib.contextmanager
def _claimed(session, specs: list[RunSpec]):
    """The claims on these configurations (:func:`kd_mlflow.tracking.claims.claimed`), taken in
    one order (their hashes') so that two waves that share some never wait on each other."""
    with contextlib.ExitStack() as stack:
        for spec in sorted(specs, key=lambda s: s.config_hash):
            stack.enter_context(claims.claimed(session, spec.config_hash, spec.name, _running(session, spec)))
        yield


def _running(session, spec: RunSpec):
    """What a waiter names: the unfinished run the claim's holder is writing, if found."""

    def run_id() -> str | None:
        rec = find_resumable(session, spec.config_hash)
        return rec.run_id if rec else None

    return run_id


def _continuing(session, store, hashes: list[str]) -> list[tuple[RunRecord | None, RunRecord | None]]:
    """Per configuration hash, (the unfinished run to continue, the unfinished run to
    supersede). Checkpoints record the runs they belong to: those runs, and no others,
    continue from them, from the newest checkpoint here or on the tracking server
    (:meth:`kd_mlflow.checkpoint.CheckpointStore.pull`). Without one, an unfinished run
    that has logged no epoch yet is taken over; one that has came from a training that
    cannot be continued (its checkpoint was never uploaded, or it was a lone run now in a
    packed wave, or the other way round): a new run starts, so that no run's curves mix
    two trainings."""
    if store is None:
        return [(None, None)] * len(hashes)
    owned = _owned_runs(session, store, hashes)
    found = owned or {h: find_resumable(session, h) for h in hashes}
    if owned or all(found.values()):
        owners = {h: r.run_id for h, r in found.items() if r}
        if store.pull(owners):
            return [(found[h], None) for h in hashes]
    out: list[tuple[RunRecord | None, RunRecord | None]] = []
    for h in hashes:
        rec = found.get(h)
        fresh = rec is None or not session.logged_epochs(rec.run_id)
        out.append((rec, None) if fresh else (None, rec))
    return out


def _owned_runs(session, store, hashes: list[str]) -> dict:
    """{config hash: the unfinished run the checkpoints here belong to} when every one of
    ``hashes`` has one; otherwise the checkpoints cannot be continued in the runs they
    belong to (finished, deleted, of another experiment, or unrecorded): they are cleared."""
    if store is None or not store.exists():
        return {}
    on_disk = store.owners_on_disk()
    owned = {h: _unfinished_run(session, on_disk[h], h) for h in hashes if h in on_disk}
    if set(hashes) <= set(owned) and all(owned.values()):
        return owned
    named = ", ".join(sorted(set(on_disk.values()))) or "no run recorded"
    print(
        f"note: the checkpoint in {store.directory} belongs to {named}, which cannot be continued here; training anew",
        file=sys.stderr,
    )
    store.clear()
    return {}


def _unfinished_run(session, run_id: str, config_hash: str) -> RunRecord | None:
    """The run, if it is an unfinished run of this configuration in this experiment."""
    try:
        run = session.client.get_run(run_id)
    except tracking.MlflowException:
        return None  # deleted for good, or never on this server
    rec = record_of(run)
    if (
        run.info.experiment_id != session.experiment_id
        or run.info.lifecycle_stage != "active"
        or rec.status not in tracking.UNFINISHED
        or rec.config_hash != config_hash
    ):
        return None
    return rec


def _supersede(old: RunRecord | None, new_run_id: str) -> None:
    if old is not None:
        print(
            f"note: run {old.run_id} ({old.status}) has no checkpoint to continue from, here or on the server; "
            f"training anew in run {new_run_id}",
            file=sys.stderr,
        )
        tracking.fail_run_by_id(old.run_id, f"superseded by run {new_run_id}: no checkpoint to continue from")


def _identity(spec: RunSpec) -> dict:
    """What a new run is created with: its config hash, findable from its first moment."""
    return {schema.CONFIG_HASH: spec.config_hash}


@contextlib.contextmanager
def _telling_of(store):
    """On the way out, say that the checkpoint is kept, where one is."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt, TrackingUnavailable) as e:
        if store is not None and store.exists():
            note_done(e, "the checkpoint is kept: the same command continues from it")
        raise


def record(
    session,
    specs: list[RunSpec],
    body: Callable[[list[Recording], list[int], object], list[Final]],
    *,
    packed: bool = False,
    force: bool = False,
    checkpoint_root: Path | None = None,
    parent_run_id: str | None = None,
) -> list[Outcome]:
    """Run ``body`` as the runs ``specs`` describe: one run, or (``packed``) several
    trained at once as one network, each recorded as its own run with the params, tags
    and identity it would have alone (a lone run is a wave of one). Each configuration
    that already has a FINISHED result is reused instead. ``body(recordings, indices,
    store)`` gets one Recording per run to train (``indices`` into ``specs``) and the
    checkpoint store (or None), and returns one Final each.

    One process at a time, on any machine that shares the tracking server, makes a
    configuration's run (:func:`_claimed`): a second one waits, then reuses the first
    one's result. With ``checkpoint_root`` the runs are resumable: the same unfinished
    configurations continue from their newest checkpoint, on local disk or, from any
    machine, on the tracking server, in the runs they began; the server's copy is
    deleted once they are FINISHED."""
    outs: list = [None] * len(specs)

    def pending() -> list[int]:
        todo = []
        for i, spec in enumerate(specs):
            existing = None if force or outs[i] else result_for(session, spec)
            if existing:
                outs[i] = reuse(session, existing)
            elif outs[i] is None:
                todo.append(i)
        return todo

    todo = pending()
    if not todo:
        return outs
    store = None
    with _claimed(session, [specs[i] for i in todo]):
        # Another process may have finished some of them while we waited.
        todo = todo if force else pending()
        if not todo:
            return outs
        if checkpoint_root is not None:
            hashes = [specs[i].config_hash for i in todo]
            # A packed wave's one checkpoint holds K networks: never a lone run's.
            store = _store(session, digest("wave", *hashes) if packed else hashes[0], checkpoint_root)
            if force:
                store.clear()
        _record(session, specs, todo, outs, body, store, packed, parent_run_id)
    if store is not None:
        store.finish()
    return outs


def _record(session, specs, todo, outs, body, store, packed: bool, parent_run_id) -> None:
    continuing = _continuing(session, store, [specs[i].config_hash for i in todo])
    writers = [
        tracking.RunWriter(session, r.run_id if r else None, specs[i].name, parent_run_id, _identity(specs[i]))
        for i, (r, _) in zip(todo, continuing, strict=True)
    ]
    for w, (_, stale) in zip(writers, continuing, strict=True):
        _supersede(stale, w.run_id)
    if store is not None:
        store.bind({specs[i].config_hash: w.run_id for i, w in zip(todo, writers, strict=True)})
    for i, w in zip(todo, writers, strict=True):
        print(f"run {w.run_id} ({specs[i].name}): {tracking.run_link(session, w.run_id)}", file=sys.stderr)
    if session.default_experiment:
        print(
            "note: this run is in MLflow's Default experiment, not where `kd-mlflow compare` looks "
            "by default; see it with `kd-mlflow compare --experiment Default` (or run with "
            "--experiment-name mysteries)",
            file=sys.stderr,
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(_telling_of(store))
        for w in writers:
            stack.enter_context(finishing(w))
        recordings = []
        for i, w in zip(todo, writers, strict=True):
            wave = {schema.PACKED: str(len(todo))} if packed else {}
            w.log_header(specs[i].params, {**specs[i].tags, schema.CONFIG_HASH: specs[i].config_hash, **wave})
            w.log_dataset(*specs[i].dataset)
            recordings.append(Recording(w))
        finals = body(recordings, todo, store)
        for rec, final in zip(recordings, finals, strict=True):
            rec.sink.flush()
            rec.writer.log_final(final.metrics)
            rec.writer.log_model(final.model, final.example)
    for i, w in zip(todo, writers, strict=True):
        outs[i] = Outcome(w.run_id, specs[i].name, False)


class EpochSink:
    """Delivers each epoch's metrics exactly once, in one request per epoch. If the
    server is unreachable, training goes on and the epochs wait here (and in the
    checkpoint's history) until it answers again; at the end, :meth:`flush` waits for a
    restarting server up to the network bound."""

    def __init__(self, writer):
        self.writer = writer
        self.delivered = writer.logged_epochs()
        self.pending: dict[int, tuple[dict, int]] = {}  # epoch: (metrics, timestamp in ms)
        self.last_error = ""

    def __call__(self, epoch: int, metrics: dict, timestamp: int | None = None) -> None:
        if epoch not in self.delivered:
            self.pending[epoch] = (metrics, timestamp or int(1000 * time.time()))
        self._try_deliver(wait=False)

    def replay(self, history: list[dict]) -> None:
        """Epochs from a resumed checkpoint that the run has not seen yet."""
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in self.delivered:
                self.pending.setdefault(epoch, (metrics, int(1000 * time.time())))

    def _try_deliver(self, wait: bool) -> bool:
        for epoch in sorted(self.pending):
            try:
                self.writer.log_epoch(epoch, *self.pending[epoch], wait=wait)
            except TrackingUnavailable as e:
                self.last_error = str(e)
                if not wait:
                    print(f"warning: metrics kept locally, training goes on: {e}", file=sys.stderr)
                return False
            self.delivered.add(epoch)
            del self.pending[epoch]
        return True

    def flush(self) -> None:
        if not self._try_deliver(wait=True):
            raise TrackingUnavailable(
                f"{len(self.pending)} epoch(s) of metrics could not be delivered to {server.tracking_uri()} "
                "(the checkpoint is kept: run the same command again to upload them); "
                f"last failure: {self.last_error}"
            )


LOG_CHECKPOINTS_ENV = "KD_MLFLOW_LOG_CHECKPOINTS"  # --log-checkpoints, for the step processes too


def log_checkpoints_every() -> int:
    """``--log-checkpoints N`` (``$KD_MLFLOW_LOG_CHECKPOINTS``): log the network every N
    epochs as a LoggedModel of its run; 0 (the default): never."""
    text = os.environ.get(LOG_CHECKPOINTS_ENV, "").strip() or "0"
    if not text.isdigit():
        raise ConfigError(LOG_CHECKPOINTS_ENV, text, "a number of epochs >= 0 (0: no checkpoints)")
    return int(text)


class CheckpointSink:
    """A network's sink with ``--log-checkpoints N``: each epoch's metrics go to the run's
    :class:`EpochSink`, and every N epochs network ``index`` of ``model`` (lone, or one of a
    packed wave's: its own weights in a copy of ``like``, its lone form) is logged as a
    LoggedModel of the run with that epoch's validation metrics. A checkpoint the server
    cannot take is said in one line and skipped: training goes on."""

    def __init__(self, inner: EpochSink, every: int, model, index: int, like, example):
        self.inner, self.every = inner, every
        self.model, self.index, self.example = model, index, example
        # What the checkpoints are logged as: a copy, so that the network being trained
        # stays where it is (a GPU), training.
        self.network = copy.deepcopy(like).to("cpu").eval()

    def __call__(self, epoch: int, metrics: dict) -> None:
        timestamp = int(1000 * time.time())  # one for the run's history and the model's metrics
        self.inner(epoch, metrics, timestamp)
        if epoch % self.every:
            return
        self.network.load_state_dict(self.model.network_states()[self.index])
        try:
            with server.impatient():
                self.inner.writer.log_checkpoint(self.network, self.example.cpu(), epoch, metrics, timestamp)
        except TrackingUnavailable as e:
            print(f"warning: the checkpoint of epoch {epoch} was not logged, training goes on: {e}", file=sys.stderr)


@contextlib.contextmanager
def finishing(writer):
    """End the run FINISHED, KILLED on a signal, FAILED on an error (its reason as a
    tag); never RUNNING (unless the server itself is gone, and cannot be told)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Interrupted(signum)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as e:
        # The same rule as the exit code: KILLED on a signal only.
        try:
            writer.end("KILLED")
            note_done(e, f"run {writer.run_id} marked KILLED")
        except (TrackingUnavailable, TrackingRefused):
            note_done(e, f"run {writer.run_id} left RUNNING (the tracking server could not be told)")
        raise
    except TrackingUnavailable:
        raise  # the server cannot be told; the run stays RUNNING and the same command continues it
    except BaseException as e:
        with contextlib.suppress(Exception):
            writer.set_tags({schema.FAILURE: cause(e)})
        with contextlib.suppress(Exception):
            writer.end("FAILED")
        raise
    else:
        writer.end("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _checkpoint_dir(session, config_hash: str, root: Path) -> Path:
    where = digest(server.tracking_uri(), session.experiment_id, config_hash)
    return Path(root) / "checkpoints" / where


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
