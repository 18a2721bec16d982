"""One composition function per command, between the CLI and the library.

Each checks its inputs, loads the data, then records its run through
:func:`kd_mlflow.runs.record` (a lone run is a wave of one), with the core params and
tags of :func:`_spec`, shared by every role: so train runs, students and ensembles log
the same core params and tags. Everything that can be
refused is refused before a run is created.

torch and the training modules are imported where they are used, so that `compare`
(and every refusal) starts without them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import runs, schema, tracking
from .config import (
    PRESETS,
    STUDENT_FIELDS,
    ConfigError,
    Recipe,
    architecture,
    check_schedule,
    default_cache_dir,
    effective_target,
    group_label,
)
from .runs import Final, Outcome, RunRecord, RunSpec

if TYPE_CHECKING:  # torch: imported where a run trains
    from .data import Source, Split


@dataclass(frozen=True)
class Execution:
    """How to run, not what: none of this changes a result's identity."""

    device: str = "auto"
    compile: bool = False
    deterministic: bool = False
    force: bool = False
    cache_dir: Path | None = None

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.cache_dir or default_cache_dir())


# --- train -------------------------------------------------------------------


def train(
    seed: int,
    recipe: Recipe,
    preset: str,
    *,
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
    register: str | None = None,
) -> Outcome:
    _check_seed(seed)
    check_device(ex)
    source, split = load_data(recipe, data_dir, ex)
    check_schedule(recipe, len(split.train_idx))
    session = session or tracking.connect(experiment)
    spec = _train_spec(seed, recipe, preset, source, split)
    body = _fitting(recipe, source, split, ex, _networks_of(recipe, [seed], source.num_classes), _plain(recipe))
    (out,) = _record(session, [spec], body, ex, parent_run_id)
    if register:
        runs.register(session, out.run_id, register)
    return out


# --- distill -----------------------------------------------------------------


def distill(
    teacher_run_id: str,
    seed: int,
    *,
    preset: str | None = None,
    overrides: dict | None = None,
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
    register: str | None = None,
) -> Outcome:
    """A student of a train run or another student (SD when that network's architecture
    is the student's, KD otherwise) or of an ensemble run (KD)."""
    check_device(ex)
    session = session or tracking.connect(experiment)
    plan = _student_plan(session, teacher_run_id, seed, preset, overrides or {}, data_dir, ex)
    existing = None if ex.force else runs.result_for(session, plan.spec)
    if existing:
        out = runs.reuse(session, existing)
    else:
        # Load (and so vet) the teacher before any run exists: a refused file creates nothing.
        teacher_model = load_network(session, plan.teacher, plan.source.num_classes, "teacher")
        body = _fitting(
            plan.recipe,
            plan.source,
            plan.split,
            ex,
            _networks_of(plan.recipe, [seed], plan.source.num_classes, [plan.draws_before]),
            lambda dd, rt, i: _student_objective(plan, teacher_model, dd, rt, ex),
        )
        (out,) = _record(session, [plan.spec], body, ex, parent_run_id)
    if register:
        runs.register(session, out.run_id, register)
    return out


@dataclass(frozen=True)
class _StudentPlan:
    spec: RunSpec
    recipe: Recipe
    source: Source
    split: Split
    teacher: RunRecord
    draws_before: int


def _student_plan(session, teacher_run_id: str, seed: int, preset, overrides: dict, data_dir, ex) -> _StudentPlan:
    _check_seed(seed)
    teacher = runs.finished(session, teacher_run_id, "teacher")
    if teacher.role == "joint":
        raise ConfigError("teacher", teacher_run_id, "a joint run is not a teacher: its members learned as one model")
    if preset and teacher.preset and preset != teacher.preset:
        raise ConfigError(
            "preset",
            preset,
            f"a student keeps its teacher's recipe ({teacher.group_label or teacher.preset}); "
            "override single fields instead (e.g. --temperature 4)",
        )
    preset = preset or teacher.preset or "custom"
    recipe = _student_recipe(preset, teacher, overrides, ex.device)
    combine = (teacher.combine or "prob") if teacher.role == "ensemble" else None
    recipe = recipe.replace(teacher_target=effective_target(recipe.teacher_target, recipe.temperature, combine))
    source, split = load_data(recipe, data_dir or teacher.data_dir, ex)
    check_schedule(recipe, len(split.train_idx))
    runs.check_same_data(teacher, split.digest, source.num_classes, "teacher")
    check_loadable(session, teacher, "teacher")
    teacher_archs = [_architecture_of(r) for r in _networks(session, teacher)]
    method = student_method(teacher.role, teacher_archs, architecture(recipe.model, recipe.width))
    t_seeds = ",".join(teacher.member_seeds) or (str(teacher.seed) if teacher.seed is not None else "")
    changed = recipe.differences(_student_recipe(preset, teacher, {}, ex.device), "student")
    spec = _spec(
        "student",
        schema.student_name(method, seed, t_seeds, schema.settings(changed)),
        recipe,
        preset,
        source,
        split,
        seed=seed,
        identity=(teacher_run_id,),
        group_parts=(method, teacher.group),
        label=group_label(preset, recipe, "student"),
        tags={
            schema.METHOD: method,
            schema.TEACHER_RUN_ID: teacher_run_id,
            schema.TEACHER_ROLE: teacher.role,
            schema.TEACHER_SEEDS: t_seeds,
            schema.TEACHER_MODEL: "+".join(dict.fromkeys(teacher_archs)),
            schema.GENERATION: str(teacher.generation + 1),
        },
    )
    from .models import draws_before_student

    return _StudentPlan(spec, recipe, source, split, teacher, draws_before_student(recipe, method))


def student_method(teacher_role: str | None, teacher_archs: list[str], student_arch: str) -> str:
    """The student's method: "sd" for a student of one network of its own architecture
    (model and width); "kd" for a student of an ensemble, or of another architecture."""
    return "sd" if teacher_role != "ensemble" and set(teacher_archs) == {student_arch} else "kd"


def _networks(session, rec: RunRecord) -> list[RunRecord]:
    """The runs whose networks a teacher holds: an ensemble's members, else itself."""
    return runs.members(session, rec) if rec.role == "ensemble" else [rec]


def _architecture_of(rec: RunRecord) -> str:
    r = rec.recipe
    return architecture(r.model, r.width)


def _student_objective(plan: _StudentPlan, teacher_model, dd, rt, ex: Execution):
    from .objectives import CachedTeacher, OnlineTeacher, objective_for, teacher_for, teacher_table

    how, temperature = plan.recipe.teacher_target, plan.recipe.temperature
    model = rt.prepare(teacher_for(teacher_model, temperature, how))
    # a target other than the teacher's output depends on T: cached apart
    table_id = plan.teacher.run_id if how == "output" else runs.digest(plan.teacher.run_id, how, temperature)
    t: OnlineTeacher | CachedTeacher
    if plan.recipe.augment:
        t = OnlineTeacher(model, rt.autocast)
    else:
        t = CachedTeacher(
            _teacher_table(
                table_id,
                plan.split.digest,
                ex,
                rt,
                lambda: teacher_table(model, dd, rt.autocast, plan.recipe.eval_batch_size),
            )
        )
    return objective_for(plan.recipe, t)


# --- packed waves: the networks of a wave trained side by side as one network ---


def train_wave(
    seeds: list[int],
    recipe: Recipe,
    preset: str,
    *,
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
) -> list[Outcome]:
    """Train runs of these seeds, the missing ones packed (kd_mlflow.pack): each is its
    own run with the identity it would have alone, so lone and packed runs reuse each other."""
    source, split = _packed_inputs(seeds, recipe, data_dir, ex)
    session = session or tracking.connect(experiment)
    specs = [_train_spec(seed, recipe, preset, source, split) for seed in seeds]
    body = _fitting(
        recipe, source, split, ex, _networks_of(recipe, seeds, source.num_classes, packed=True), _plain(recipe)
    )
    return _record(session, specs, body, ex, parent_run_id, packed=True)


def _packed_inputs(seeds: list[int], recipe: Recipe, data_dir, ex: Execution, needs: str | None = None):
    """(source, split) for networks of these seeds packed side by side, once every
    refusal has had its chance (seeds, device, a network that cannot be packed, data,
    schedule): before any run exists. ``needs``: what packs them, if not --pack."""
    for seed in seeds:
        _check_seed(seed)
    check_device(ex)
    from .models import check_packable

    check_packable(recipe.model, needs)
    source, split = load_data(recipe, data_dir, ex)
    check_schedule(recipe, len(split.train_idx))
    return source, split


def distill_wave(
    students: list[tuple[str, int, dict]],
    *,
    preset: str | None = None,
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
) -> list[Outcome]:
    """Students of (teacher run, seed, overrides), the missing ones packed: one training
    recipe and one split for all; each keeps its own distillation settings (temperature,
    alpha, loss), which only its objective sees."""
    check_device(ex)
    session = session or tracking.connect(experiment)
    plans = [_student_plan(session, t, seed, preset, over, data_dir, ex) for t, seed, over in students]
    if len({(tuple(sorted(p.recipe.fields_for("train").items())), p.split.digest) for p in plans}) > 1:
        ids = ",".join(t for t, _, _ in students)
        raise ConfigError("pack", ids, "a packed wave needs one training recipe and one split")
    first = plans[0]
    from .models import check_packable

    check_packable(first.recipe.model)
    teachers = {i: load_network(session, p.teacher, p.source.num_classes, "teacher") for i, p in enumerate(plans)}
    seeds, draws = [seed for _, seed, _ in students], [p.draws_before for p in plans]
    body = _fitting(
        first.recipe,
        first.source,
        first.split,
        ex,
        _networks_of(first.recipe, seeds, first.source.num_classes, draws, packed=True),
        lambda dd, rt, i: _student_objective(plans[i], teachers[i], dd, rt, ex),
    )
    return _record(session, [p.spec for p in plans], body, ex, parent_run_id, packed=True)


def student_changes(preset: str, teacher: RunRecord, overrides: dict, device: str) -> dict:
    """The fields ``overrides`` change of what a student of ``teacher`` would otherwise
    train with (its teacher's recipe and the preset's distillation settings)."""
    changed = _student_recipe(preset, teacher, overrides, device)
    return changed.differences(_student_recipe(preset, teacher, {}, device), "student")


def _student_recipe(preset: str, teacher: RunRecord, overrides: dict, device: str) -> Recipe:
    """The teacher's training recipe (an ensemble's: its members'), with the preset's
    distillation settings, then the fields the user overrode: a student never silently
    drops what its teacher was trained with. What it changes shows in its group label.
    Planned for the machine as a training run is (train.plan_run): an explicit
    ``precision=auto`` is the teacher's bf16 on a CPU that computes it, not float32."""
    from .train import plan_run

    base = teacher.recipe
    own = {k: getattr(PRESETS[preset], k) for k in STUDENT_FIELDS} if preset in PRESETS else {}
    try:
        recipe = base.replace(**{**own, **overrides})
    except TypeError as e:  # e.g. a tuple field given a scalar
        raise ConfigError("recipe", overrides, str(e)) from None
    return plan_run(recipe, preset, device)


# --- joint: the K networks trained as one model, the mean of their logits ---------


JOINT_PACKS = "a joint model packs its members (kd_mlflow.pack)"


def joint(
    seeds: list[int],
    recipe: Recipe,
    preset: str,
    *,
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
) -> Outcome:
    """Allen-Zhu and Li's "training the average directly": the train runs' networks of
    these seeds, each initialised as its own train run's, trained together as one model
    (kd_mlflow.pack.JointModel) with the cross-entropy of their mean logits, on the train
    runs' split and batch order. One run, in the train runs' group."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", ",".join(map(str, seeds)), "a joint model needs at least two distinct seeds")
    source, split = _packed_inputs(seeds, recipe, data_dir, ex, JOINT_PACKS)
    session = session or tracking.connect(experiment)
    member_seeds = ",".join(map(str, seeds))
    spec = _spec(
        "joint",
        schema.joint_name(seeds),
        recipe,
        preset,
        source,
        split,
        recipe_role="train",
        group_role="train",
        # joint_grad at its default is left out: the joint runs made before it keep their identity
        identity=(*seeds, *([recipe.joint_grad] if recipe.joint_grad != "mean" else [])),
        label=group_label(preset, recipe, "train")
        + (f" · joint_grad={recipe.joint_grad}" if recipe.joint_grad != "mean" else ""),
        params={"member_seeds": member_seeds, "n_members": len(seeds), "joint_grad": recipe.joint_grad},
        tags={schema.MEMBER_SEEDS: member_seeds},
    )

    def networks(indices):
        model = joint_network(recipe, seeds, source.num_classes)
        return model, [model]

    body = _fitting(recipe, source, split, ex, networks, _plain(recipe), _member_accuracies(recipe))
    (out,) = _record(session, [spec], body, ex, parent_run_id)
    return out


def joint_network(recipe: Recipe, seeds: list[int], num_classes: int):
    """The joint model of ``seeds`` before training (kd_mlflow.pack.JointModel, on the
    CPU): member k is, bit for bit, the network seed k's train run starts from."""
    from .pack import joint as joint_model

    return joint_model([_seeded_network(recipe, s, num_classes) for s in seeds], recipe.joint_grad)


def _member_accuracies(recipe: Recipe):
    """A joint model's more results: each member's own accuracy at the selected epoch."""

    def more(model, dd, rt) -> dict:
        from .train import evaluate_stacked

        out = {}
        for which in ("val", "test"):
            accs = evaluate_stacked(model.members, dd, which, recipe, rt)[1]
            out.update({f"member_{k}_{which}_acc": acc for k, acc in enumerate(accs.tolist())})
        return out

    return more


# --- ensemble ----------------------------------------------------------------


def ensemble(
    member_run_ids: list[str],
    *,
    combine: str = "prob",
    data_dir: str | None = None,
    experiment: str | None = None,
    ex: Execution = Execution(),
    parent_run_id: str | None = None,
    session=None,
    allow_mixed: bool = False,
) -> Outcome:
    """An ensemble of finished train or student runs of one recipe (one group); members
    of several groups only with ``allow_mixed``, and then the run says so (kd.mixed):
    compare shows it apart, in no group's mean."""
    if len(member_run_ids) < 2 or len(set(member_run_ids)) != len(member_run_ids):
        raise ConfigError("members", ",".join(member_run_ids), "need at least two distinct runs")
    check_device(ex)
    session = session or tracking.connect(experiment)
    members = [runs.finished(session, rid, "members") for rid in member_run_ids]
    for m in members:
        if m.role not in ("train", "student"):
            raise ConfigError("members", m.run_id, "not a train or student run")
        check_loadable(session, m, "members")
    first = members[0]
    recipe = first.recipe
    source, split = load_data(recipe, data_dir or first.data_dir, ex)
    for m in members:
        runs.check_same_data(m, split.digest, source.num_classes, "members")
    roles = {m.role or "" for m in members}
    member_role = roles.pop() if len(roles) == 1 else "mixed"
    seeds = [str(m.seed) if m.seed is not None else "?" for m in members]
    preset = first.preset or ""
    base = first.group_label or group_label(preset, recipe, member_role)
    labels = sorted({m.group_label or m.preset or m.run_id for m in members})
    mixed = len({m.group for m in members}) > 1
    if mixed and not allow_mixed:
        raise ConfigError(
            "members",
            ",".join(member_run_ids),
            f"members of different recipes ({'; '.join(labels)}): their mean would mix them; "
            "pass --allow-mixed to ensemble them anyway",
        )
    if mixed:
        base = "mixed: " + " + ".join(labels)
    spec = _spec(
        "ensemble",
        schema.ensemble_name(seeds, member_role),
        recipe,
        preset,
        source,
        split,
        recipe_role=member_role,
        identity=(combine, *sorted(member_run_ids)),
        group_parts=(combine, member_role, *sorted({m.group or "" for m in members})),
        label=base + (f" · ensemble: {combine}" if combine != "prob" else ""),
        params={"combine": combine, "n_members": len(members)},
        tags={
            schema.MEMBER_RUN_IDS: ",".join(member_run_ids),
            schema.MEMBER_SEEDS: ",".join(seeds),
            schema.MEMBER_ROLE: member_role,
            schema.GENERATION: str(max(m.generation for m in members)),
            **({schema.MIXED: "true"} if mixed else {}),
        },
    )

    def body(recordings, indices, store) -> list[Final]:
        from . import data as data_mod
        from .ensemble import Ensemble
        from .train import make_runtime

        (rec,) = recordings

        rt = make_runtime(recipe, ex.device, deterministic=ex.deterministic)
        model = rt.prepare(
            Ensemble([load_network(session, m, source.num_classes, "members") for m in members], combine)
        )
        dd = data_mod.DeviceData(source, split, rt.device)
        calibration, scores = _log_predictions(rec, model, dd, recipe, rt)
        final = {
            schema.FINAL_VAL_ACC: scores["val_acc"],
            schema.FINAL_TEST_ACC: scores["test_acc"],
            "val_loss": scores["val_loss"],
            **calibration,
        }
        for i, m in enumerate(members):
            final[f"member_{i}_val_acc"] = m.final_val_acc if m.final_val_acc is not None else float("nan")
            final[f"member_{i}_test_acc"] = m.final_test_acc if m.final_test_acc is not None else float("nan")
        print(
            f"ensemble of {len(members)}: val_acc {scores['val_acc']:.2f}  test_acc {scores['test_acc']:.2f}",
            file=sys.stderr,
        )
        return [Final(final, model, dd.test_x[:2].cpu())]

    (out,) = runs.record(session, [spec], body, force=ex.force, parent_run_id=parent_run_id)
    return out


def members_for_seeds(
    seeds: list[int], preset: str | None, dataset: str | None, experiment: str | None = None, session=None
) -> list[str]:
    session = session or tracking.connect(experiment)
    return [r.run_id for r in runs.train_runs_for_seeds(session, seeds, preset, dataset)]


# --- the shared path ---------------------------------------------------------


def _train_spec(seed: int, recipe: Recipe, preset: str, source, split) -> RunSpec:
    return _spec(
        "train",
        schema.train_name(seed),
        recipe,
        preset,
        source,
        split,
        seed=seed,
        label=group_label(preset, recipe, "train"),
    )


def _spec(
    role: str,
    name: str,
    recipe: Recipe,
    preset: str,
    source,
    split,
    *,
    seed: int | None = None,
    recipe_role: str | None = None,
    group_role: str | None = None,
    identity: tuple = (),
    group_parts: tuple = (),
    label: str = "",
    params: dict | None = None,
    tags: dict | None = None,
) -> RunSpec:
    """The core params and tags every role logs, and its identity: the configuration
    hash (what changes the result) and the group (the same, less the seed; a run of
    ``group_role``'s group, where given: a joint run is in its train runs' group)."""
    recipe_role = recipe_role or role
    group = runs.digest(group_role or role, recipe.digest(recipe_role), split.digest, *group_parts)
    config_hash = runs.digest(role, recipe.digest(recipe_role), split.digest, seed, *identity)
    core_params = {
        **recipe.as_params(recipe_role),
        "preset": preset,
        "data_dir": source.location,
        "num_classes": source.num_classes,
        "split_digest": split.digest,
        "n_train": len(split.train_idx),
        "n_val": len(split.val_idx),
        "n_test": len(source.test_y),
    }
    if seed is not None:
        core_params["seed"] = seed
    core_tags = {
        schema.ROLE: role,
        schema.PRESET: preset,
        schema.DATASET: recipe.dataset,
        schema.SPLIT_DIGEST: split.digest,
        schema.NUM_CLASSES: str(source.num_classes),
        schema.GROUP: group,
        schema.GROUP_LABEL: label or preset,
    }
    if seed is not None:
        core_tags[schema.SEED] = str(seed)
    return RunSpec(
        name,
        config_hash,
        {**core_params, **(params or {})},
        {**core_tags, **(tags or {})},
        (f"{recipe.dataset}-train", source.uri, split.digest),
        recipe,
        recipe_role,
    )


def _fitting(recipe: Recipe, source, split, ex: Execution, networks, objective, more=None):
    """The body of a training run, or of a packed wave of them (:func:`kd_mlflow.runs.record`):
    the one loop, each network's checkpoint selected on validation. Lone, packed and joint
    runs differ only in what they pass: ``networks(indices)``, the model the loop trains
    and, per run, its network in it; ``objective(dd, rt, i)``, the objective of run ``i``
    of the wave; ``more(network, dd, rt)``, results beyond the selection's (a joint
    model's members)."""

    def body(recordings, indices, store) -> list[Final]:
        from . import data as data_mod
        from .train import fit, make_runtime

        rt = make_runtime(recipe, ex.device, ex.compile, ex.deterministic)
        for rec in recordings:
            rec.set_tags(_runtime_tags(rt))
        model, nets = networks(indices)
        dd = data_mod.DeviceData(source, split, rt.device)
        objectives = [objective(dd, rt, i) for i in indices]
        model = rt.prepare(model)
        sinks = [
            rec.sink_for(model, dd.test_x[:2], k, net)
            for k, (rec, net) in enumerate(zip(recordings, nets, strict=True))
        ]
        results = fit(model, objectives, dd, recipe, rt, sinks, store)
        finals = []
        for rec, net, result in zip(recordings, nets, results, strict=True):
            final = _selected(rec, rt.prepare(net), result, dd, recipe, rt)  # net now holds the selected weights
            if more:
                final.metrics.update(more(net, dd, rt))
            finals.append(final)
        return finals

    return body


def _networks_of(recipe: Recipe, seeds: list[int], num_classes: int, draws=None, packed: bool = False):
    """``networks`` for :func:`_fitting`: run ``i``'s network seeded and built as it would
    be alone; in a packed wave, the wave's networks side by side (kd_mlflow.pack).
    ``draws``: per run, networks drawn and thrown away after seeding (the report's SD
    script built its teacher's network first)."""

    def networks(indices):
        from .pack import pack

        nets = [_seeded_network(recipe, seeds[i], num_classes, (draws or [0] * len(seeds))[i]) for i in indices]
        return (pack(nets) if packed else nets[0]), nets

    return networks


def _plain(recipe: Recipe):
    """``objective`` for :func:`_fitting` of runs without a teacher: the recipe's."""

    def objective(dd, rt, i):
        from .objectives import objective_for

        return objective_for(recipe)

    return objective


def _record(session, specs: list[RunSpec], body, ex: Execution, parent_run_id, packed: bool = False) -> list[Outcome]:
    return runs.record(
        session,
        specs,
        body,
        packed=packed,
        force=ex.force,
        checkpoint_root=ex.checkpoint_root,
        parent_run_id=parent_run_id,
    )


def _seeded_network(recipe: Recipe, seed: int, num_classes: int, draws_before: int = 0):
    """The network of model seed ``seed``, as every run that trains it builds it: lone,
    packed or a member of a joint model."""
    import torch

    from . import models

    torch.manual_seed(seed)  # the model seed sets the initialisation, nothing else
    return models.build(recipe, num_classes, draws_before=draws_before)


def _teacher_table(teacher_run_id: str, split_digest: str, ex: Execution, rt, compute):
    """A teacher's logits on the training images, computed once per teacher run, split,
    device type and precision, and kept beside the checkpoints: the students of one
    teacher (other seeds, temperatures, alphas) reuse it."""
    import torch

    from .checkpoint import CorruptCheckpoint, dump, parse, write_atomic

    key = runs.digest(teacher_run_id, split_digest, rt.device.type, rt.precision)
    path = ex.checkpoint_root / "teacher-tables" / f"{key}.ckpt"
    if path.is_file():
        try:
            return parse(path.read_bytes(), str(path))["logits"].to(rt.device)
        except (CorruptCheckpoint, KeyError):
            pass  # recomputed below
    logits = compute()
    write_atomic(path, dump({"logits": logits.detach().to("cpu", torch.float32)}))
    return logits


def _runtime_tags(rt) -> dict:
    """What the numbers depend on beyond the recipe (after make_runtime: it sets TF32)."""
    import torch

    from . import machine

    return {
        schema.DEVICE: rt.device,
        schema.PRECISION_RESOLVED: rt.precision,
        schema.THREADS: torch.get_num_threads(),
        **machine.env_tags(rt.device),
    }


def _selected(rec, model, result, dd, recipe, rt) -> Final:
    """After the loop: the epochs' metrics first (if the server is gone, the checkpoint
    keeps them), then the best-validation weights, their predictions and results."""
    rec.sink.replay(result.history)
    rec.sink.flush()
    model.load_state_dict(result.best_state)
    calibration, _ = _log_predictions(rec, model, dd, recipe, rt)
    return Final(
        {
            schema.FINAL_VAL_ACC: result.best_val_acc,
            schema.FINAL_TEST_ACC: result.best_test_acc,
            schema.BEST_EPOCH: result.best_epoch,
            **calibration,
        },
        model,
        dd.test_x[:2].cpu(),
    )


def _log_predictions(rec, model, dd, recipe, rt) -> tuple[dict, dict]:
    """Logs the model's predictions; returns its test calibration (test_nll, test_ece,
    test_brier), computed from the probabilities as the artifact stores them (NLL from
    the float32 log-probabilities it stores beside them), and what the predictions say
    besides (val_acc and test_acc, counted from the predicted classes as evaluation
    counts them; val_loss, the validation NLL): a model that is not trained here (an
    ensemble) needs no second pass over the images."""
    from .calibration import measure
    from .predictions import log_probs_of, stored
    from .train import predict

    probs_val, pred_val = predict(model, dd, "val", recipe, rt)
    probs_test, pred_test = predict(model, dd, "test", recipe, rt)
    rec.log_predictions(
        probs_val.numpy(),
        probs_test.numpy(),
        dd.val_y.cpu().numpy(),
        dd.test_y.cpu().numpy(),
        pred_val=pred_val.numpy(),
        pred_test=pred_test.numpy(),
    )
    y, top = dd.test_y.cpu().numpy(), pred_test.numpy()
    logp_label = log_probs_of(probs_test.numpy(), y, top)[0]
    y_val, top_val = dd.val_y.cpu().numpy(), pred_val.numpy()
    read = {
        "val_acc": 100.0 * int((top_val == y_val).sum()) / len(y_val),  # as evaluate_stacked divides
        "test_acc": 100.0 * int((top == y).sum()) / len(y),
        "val_loss": -float(log_probs_of(probs_val.numpy(), y_val, top_val)[0].astype("float64").mean()),
    }
    return measure(stored(probs_test.numpy()), y, top, logp_label).as_metrics(), read


def load_data(recipe: Recipe, data_dir, ex: Execution):
    import torch

    from . import data as data_mod

    # A study's step processes (and Ray workers) use the driver's CPU thread count:
    # CPU float results depend on it.
    if os.environ.get("KD_MLFLOW_THREADS"):
        torch.set_num_threads(int(os.environ["KD_MLFLOW_THREADS"]))

    source = data_mod.load(recipe.dataset, data_dir, ex.cache_dir)
    return source, data_mod.make_split(source, recipe)


def check_device(ex: Execution) -> None:
    from .machine import check_device as check

    check(ex.device)


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("seed", seed, "must be an integer >= 0")


def check_loadable(session, rec: RunRecord, option: str) -> None:
    if rec.role == "ensemble":
        for m in runs.members(session, rec):
            runs.check_weights(session, m, option)
    else:
        runs.check_weights(session, rec, option)


def load_network(session, rec: RunRecord, num_classes: int, option: str):
    """A train/student run's network, or an ensemble of them, rebuilt on the CPU from
    weights that load without pickle."""
    from . import models
    from .ensemble import Ensemble

    if rec.role == "ensemble":
        nets = [load_network(session, m, num_classes, option) for m in runs.members(session, rec)]
        return Ensemble(nets, rec.combine or "prob").eval()
    model = models.build(rec.recipe, num_classes)
    try:
        model.load_state_dict(runs.load_weights(rec, option))
    except RuntimeError as e:  # a state dict of another shape
        raise ConfigError(option, rec.run_id, f"weights do not fit: {str(e).splitlines()[0]}") from None
    return model.eval()
