"""The joint model (Allen-Zhu and Li's "training the average directly"): K networks of
the train recipe, each starting from its seed's train-run network, trained as one
model whose logits are the mean of theirs, with the cross-entropy on that mean.

The references are written from that definition: K lone networks built as a train run
builds them (seed, then models.build), their logits averaged. CPU, the smoke preset,
one thread; the trajectory in float64, where packed and lone kernels' rounding stays
far below the tolerance (tests/test_pack.py says why fp32 trajectories drift)."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, run_cli

from kd_mlflow import compare, config, data, models, runs, schema, steps, study, tracking
from kd_mlflow.objectives import CrossEntropy
from kd_mlflow.runs import Outcome, RunRecord
from kd_mlflow.train import fit, make_runtime

SEEDS = [0, 1, 2]
SUBSET = 320  # training images where a test trains: five steps of smoke's batch 64


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _lone(recipe, seed, dtype=torch.float64):
    """Seed ``seed``'s network as its train run starts from it (README: the model seed
    sets only the initialisation)."""
    torch.manual_seed(seed)
    return models.build(recipe, 10).to(dtype)


def _setup(digits, **overrides):
    recipe = config.preset("smoke").replace(**overrides)
    rt = make_runtime(recipe, "cpu")
    return recipe, rt, data.DeviceData(digits, data.make_split(digits, recipe), rt.device)


def test_members_start_from_the_seeds_initial_weights_bit_for_bit():
    recipe = config.preset("smoke")
    model = steps.joint_network(recipe, SEEDS, 10)
    states = model.members.network_states()
    assert len(states) == len(SEEDS)
    for seed, state in zip(SEEDS, states, strict=True):
        lone = _lone(recipe, seed, torch.float32).state_dict()
        assert state.keys() == lone.keys()
        for key, value in lone.items():
            assert torch.equal(state[key], value), f"seed {seed}: {key}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_one_step_loss_and_gradients_are_those_of_the_lone_networks_mean(digits, dtype):
    recipe, _, dd = _setup(digits)
    batch = next(dd.train_batches(recipe, torch.Generator().manual_seed(recipe.order_seed)))
    lone = [_lone(recipe, s, dtype).train() for s in SEEDS]
    reference = F.cross_entropy(torch.stack([net(batch.x) for net in lone]).mean(0), batch.y)
    reference.backward()

    model = steps.joint_network(recipe, SEEDS, 10).to(dtype).train()
    loss = CrossEntropy()(model(batch.x), batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    # Each member's gradient, in a lone network's layout: the packed gradients put where
    # the packed weights are, then read back as the K networks' states.
    grads = model.members
    with torch.no_grad():
        for p in grads.parameters():
            p.copy_(p.grad)
    for k, (net, state) in enumerate(zip(lone, grads.network_states(), strict=True)):
        for name, p in net.named_parameters():
            torch.testing.assert_close(state[name], p.grad, atol=1e-5, rtol=1e-4, msg=f"member {k}: {name}")


def test_a_joint_training_is_the_definitions_step_by_step(digits):
    """fit, given the joint model as one network, takes the steps of a loop written from
    the definition: the same batches as the train runs, Adam over the K networks, the
    cross-entropy of their mean logits; and it selects on the joint model's accuracy."""
    recipe, rt, dd = _setup(digits, epochs=1, train_subset=SUBSET)
    losses: list[float] = []
    model = steps.joint_network(recipe, SEEDS, 10).to(torch.float64)
    (result,) = fit(
        model, [CrossEntropy()], dd, recipe, rt, log=io.StringIO(), on_step=lambda z: losses.append(z.item())
    )

    lone = torch.nn.ModuleList([_lone(recipe, s) for s in SEEDS]).train()
    optimizer = torch.optim.Adam(lone.parameters(), lr=recipe.lr)
    reference = []
    for batch in dd.train_batches(recipe, torch.Generator().manual_seed(recipe.order_seed)):
        loss = F.cross_entropy(torch.stack([net(batch.x) for net in lone]).mean(0), batch.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.append(loss.item())
    assert len(losses) == len(reference) > 1
    assert losses == pytest.approx(reference, abs=1e-5)

    lone.eval()
    with torch.no_grad():
        mean = torch.stack([net(dd.val_x) for net in lone]).mean(0)
    assert result.best_val_acc == pytest.approx(100.0 * (mean.argmax(1) == dd.val_y).double().mean().item())


class _Crash(Exception):
    pass


def test_an_interrupted_joint_training_resumes_bit_for_bit(digits, tmp_path):
    """Killed after epoch 1 of 2, the joint model continues from its checkpoint to the
    weights, history and selection of an uninterrupted training."""
    from kd_mlflow.checkpoint import CheckpointStore

    class CrashAfter(CheckpointStore):
        def save(self, state):
            path = super().save(state)
            if state["epoch"] == 1:
                raise _Crash
            return path

    recipe, rt, dd = _setup(digits, epochs=2, train_subset=SUBSET)

    def training(store, log=None):
        model = steps.joint_network(recipe, SEEDS[:2], 10)
        return model, fit(model, [CrossEntropy()], dd, recipe, rt, log=log or io.StringIO(), checkpoints=store)[0]

    full_model, full = training(None)
    with pytest.raises(_Crash):
        training(CrashAfter(tmp_path / "ckpt"))
    log = io.StringIO()
    model, resumed = training(CheckpointStore(tmp_path / "ckpt"), log)
    assert "resuming after epoch 1" in log.getvalue()
    assert (resumed.best_epoch, resumed.best_val_acc) == (full.best_epoch, full.best_val_acc)
    timeless = [[{k: v for k, v in h.items() if k != "epoch_seconds"} for h in r.history] for r in (full, resumed)]
    assert timeless[0] == timeless[1]
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_a_joint_run_is_placed_with_the_train_runs_of_its_group():
    """compare lists a joint run where the train runs of its recipe are: in their table,
    not apart nor unattached."""
    recipe = config.preset("smoke")
    params = {**recipe.as_params("train"), "preset": "smoke"}
    common = dict(preset="smoke", dataset="digits", group="g1", group_label="smoke", params=params)
    records = [
        RunRecord(f"t{s}", role="train", seed=s, config_hash=f"h{s}", final_test_acc=80.0 + s, **common) for s in (0, 1)
    ]
    records.append(
        RunRecord("j", role="joint", member_seeds=("0", "1"), config_hash="hj", final_test_acc=79.0, **common)
    )
    (table,) = compare.build_tables(runs.records_frame(records))
    assert table.group_id == "g1"
    assert list(table.seeds["run_id"]) == ["t0", "t1"]
    assert list(table.joint["run_id"]) == ["j"] and list(table.joint["test_acc"]) == [79.0]
    assert not any("j" in note.split() for note in table.notes), table.notes
    assert not pd.isna(table.summary.set_index("row").loc["single models", "test_mean"])


class _Recorded:
    """An executor that runs nothing: it names each wave's steps."""

    def __init__(self):
        self.waves: list[list] = []

    def run_wave(self, items, ctx, progress):
        self.waves.append(items)
        for step in items:
            progress.starting(step)
        return [Outcome(f"id-{s.name}", s.name, False) for s in items]

    def close(self):
        pass


def test_a_study_of_ten_seeds_with_joint_ends_with_the_ten_member_joint_step():
    plan = study.Plan("smoke", config.preset("smoke"), {}, config.parse_seeds("0-9"), joint=True)
    ctx = study.Context(plan, steps.Execution(), "parent")
    executor, log = _Recorded(), io.StringIO()
    progress = study.Progress(plan.n_steps, plan.n_trainings, log)
    result = study.StudyResult("parent")
    study._waves(plan, ctx, executor, result, progress)
    (last,) = executor.waves[-1]
    assert isinstance(last, study.JointStep) and last.name == "joint-seeds-0-9"
    assert sum(len(w) for w in executor.waves) == plan.n_steps == 24
    assert f"[step {plan.n_steps}/{plan.n_steps}] joint-seeds-0-9" in log.getvalue()
    # As a --jobs study runs it (`kd-mlflow _step`): the same step, under the same parent.
    (again,), where = study.Context.from_json(ctx.to_json([last]))
    assert again == last and (where.plan.preset, where.parent) == ("smoke", "parent")
    # Without --joint the study is the one it was.
    plain = study.Plan("smoke", config.preset("smoke"), {}, [0, 1])
    assert plain.n_steps == 7 and plain.n_trainings == 5


def test_a_network_that_cannot_be_packed_is_refused_before_any_run(tracked):
    """A joint model packs its members: resnet20 is refused in one line naming it, by the
    command and by a study with --joint, before anything is logged."""
    for argv in (
        ["joint", "--seeds", "0-1", "--preset", "smoke", "--model", "resnet20"],
        ["reproduce", "--seeds", "0-1", "--preset", "smoke", "--model", "resnet20", "--joint"],
    ):
        res = invoke(*argv)
        assert res.exit_code == 2, res.output
        assert "resnet20" in res.stderr and "joint model packs" in res.stderr, res.stderr
    assert tracked.runs() == []


def test_joint_run_end_to_end_and_a_rerun_reuses_it(tracked):
    args = ("joint", "--seeds", "0-1", "--preset", "smoke", "--epochs", "1")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    run = tracked.client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == "joint-seeds-0-1"
    assert tags[schema.ROLE] == "joint" and tags[schema.MEMBER_SEEDS] == "0,1"
    assert schema.SEED not in tags
    recipe = config.resolve("smoke", epochs=1)
    source, split = steps.load_data(recipe, None, steps.Execution())
    train_tags = steps._train_spec(0, recipe, "smoke", source, split).tags
    for tag in (schema.GROUP, schema.GROUP_LABEL, schema.PRESET, schema.DATASET, schema.SPLIT_DIGEST):
        assert tags[tag] == train_tags[tag], tag
    for k in (0, 1):
        for which in ("val", "test"):
            assert 0.0 <= metrics[f"member_{k}_{which}_acc"] <= 100.0
    history = tracked.client.get_metric_history(run_id, "val_acc")
    assert [m.step for m in history] == [1] and metrics[schema.BEST_EPOCH] == 1
    assert metrics[schema.FINAL_VAL_ACC] == pytest.approx(history[0].value)

    preds = runs.predictions_of(None, runs.get(tracking.connect(tracked.experiment), run_id, "run"))
    argmax_acc = 100.0 * float(np.mean(np.argmax(preds.probs_test, 1) == preds.labels_test))
    assert argmax_acc == pytest.approx(metrics[schema.FINAL_TEST_ACC], abs=1e-9)
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")  # the joint model, whole
    with torch.no_grad():
        logged_acc = 100.0 * (logged(source.test_x).argmax(1) == source.test_y).double().mean().item()
    assert logged_acc == pytest.approx(metrics[schema.FINAL_TEST_ACC], abs=1e-9)

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == run_id
    assert f"reusing finished run {run_id}" in again.stderr and "epoch 1/1" not in again.stderr
    assert len(tracked.runs()) == 1
