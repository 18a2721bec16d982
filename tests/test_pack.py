"""Packed training (kd_mlflow.pack) against the lone networks it stands for: K networks
trained as one give each network's lone losses, selected epoch and accuracies. CPU,
the smoke preset (8x8 digits, width 4), one thread for repeatable kernels.

Packed and lone convolutions round differently (~1e-7 in fp32), and at smoke's Adam
lr 1e-2 such differences grow chaotically: after ~15 steps lone runs with 1 and with 2
threads already differ by 1e-3 in loss and, after 2 epochs, by a few validation images.
So fp32 is compared over the first steps; whole trainings are compared in float64,
where the same kernels' rounding stays far below every tolerance."""

from __future__ import annotations

import io

import pytest
import torch

from kd_mlflow import config, data, models
from kd_mlflow.objectives import CachedTeacher, CrossEntropy, Distillation
from kd_mlflow.pack import pack, unpack
from kd_mlflow.train import fit, make_runtime

SEEDS = (0, 1, 2)
STEPS_COMPARED = 10  # first optimiser steps whose losses must agree to 1e-4
# Training images (of smoke's 1,238): 6 steps an epoch, so that a whole training is
# cheap; what packing must preserve (per-step losses, selection, evaluation on all 200
# validation images) does not depend on how many steps an epoch has.
TRAIN_SUBSET = 384


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


class Recorded:
    """An objective that keeps every step's loss."""

    def __init__(self, objective):
        self.objective, self.losses = objective, []

    def __call__(self, logits, batch):
        loss = self.objective(logits, batch)
        self.losses.append(loss.item())
        return loss


def _setup(digits, **overrides):
    recipe = config.preset("smoke").replace(**{"train_subset": TRAIN_SUBSET, **overrides})
    rt = make_runtime(recipe, "cpu")
    dd = data.DeviceData(digits, data.make_split(digits, recipe), rt.device)
    return recipe, rt, dd


def _build(recipe, seed, dtype=torch.float32):
    torch.manual_seed(seed)  # as steps._train: the model seed sets the initialisation
    return models.build(recipe, 10).to(dtype)


def _lone_and_packed(recipe, rt, dd, make_objective, dtype=torch.float64):
    lone_obj = [Recorded(make_objective(i)) for i in range(len(SEEDS))]
    lone = [
        fit(_build(recipe, s, dtype), [o], dd, recipe, rt, log=io.StringIO())[0]
        for s, o in zip(SEEDS, lone_obj, strict=True)
    ]
    packed_obj = [Recorded(make_objective(i)) for i in range(len(SEEDS))]
    sunk = [[] for _ in SEEDS]
    sinks = [lambda epoch, m, out=out: out.append((epoch, m)) for out in sunk]
    packed = fit(pack([_build(recipe, s, dtype) for s in SEEDS]), packed_obj, dd, recipe, rt, sinks, log=io.StringIO())
    steps = STEPS_COMPARED if dtype == torch.float32 else None  # float64: every step
    for a, b in zip(lone_obj, packed_obj, strict=True):
        assert len(a.losses) == len(b.losses)
        assert a.losses[:steps] == pytest.approx(b.losses[:steps], abs=1e-4)
    if dtype == torch.float32:
        return lone, packed
    for a, b, out in zip(lone, packed, sunk, strict=True):
        assert b.best_epoch == a.best_epoch
        assert b.best_val_acc == pytest.approx(a.best_val_acc, abs=0.1)
        assert b.best_test_acc == pytest.approx(a.best_test_acc, abs=0.1)
        assert len(b.history) == recipe.epochs and [e for e, _ in out] == [1, 2]
        assert set(b.history[0]) == set(a.history[0])
        for ha, hb in zip(a.history, b.history, strict=True):
            assert hb["train_loss"] == pytest.approx(ha["train_loss"], abs=1e-3)
            assert hb["val_acc"] == pytest.approx(ha["val_acc"], abs=0.1)
        # The selected checkpoint is a lone model's state dict.
        check = _build(recipe, 99)
        check.load_state_dict(b.best_state)
    return lone, packed


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # smoke: Adam, no augmentation
        # SGD with nesterov momentum and L2 weight decay, and crop/flip: the draws come from
        # the order seed, so every lone network gets the same ones, as the packed ones do.
        {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-3, "augment": True},
    ],
    ids=["adam", "sgd-wd-augment"],
)
def test_packed_training_equals_lone_training(digits, overrides):
    recipe, rt, dd = _setup(digits, **overrides)
    _lone_and_packed(recipe, rt, dd, lambda i: CrossEntropy())


def test_packed_fp32_first_steps_equal_lone_steps(digits):
    recipe, rt, dd = _setup(digits)
    assert recipe.epochs * dd.n_train // recipe.batch_size >= STEPS_COMPARED
    _lone_and_packed(recipe, rt, dd, lambda i: CrossEntropy(), torch.float32)


def test_packed_distillation_each_network_its_own_teacher(digits):
    recipe, rt, dd = _setup(digits, temperature=2.0, alpha=0.7)
    g = torch.Generator().manual_seed(7)
    tables = [3 * torch.randn(dd.n_train, 10, generator=g) for _ in SEEDS]
    _lone_and_packed(recipe, rt, dd, lambda i: Distillation(CachedTeacher(tables[i]), recipe.temperature, recipe.alpha))


def test_unpack_loads_into_lone_models_and_reproduces_the_packed_logits(digits):
    recipe, _rt, dd = _setup(digits)
    lone = [_build(recipe, s) for s in SEEDS]
    packed = pack(lone)
    # A few training steps, so weights and batch-norm statistics differ from the init.
    opt = torch.optim.Adam(packed.parameters(), lr=1e-2)
    packed.train()
    for start in range(0, 256, 64):
        logits = packed(dd.train_x[start : start + 64])
        y = dd.train_y[start : start + 64]
        loss = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    packed.eval()
    with torch.no_grad():
        want = packed(dd.val_x)
        for i, state in enumerate(unpack(packed)):
            model = _build(recipe, 99)
            model.load_state_dict(state)
            got = model.eval()(dd.val_x)
            torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-5)


def test_a_pack_of_seed_report_networks_gives_each_lone_networks_logits(digits):
    """seed-report's mechanisms (torchvision's stem, PIL's two rounded resize passes):
    the packed module preprocesses as each lone network does, bit for bit, and gives
    each network's logits (float64: the grouped convolutions' rounding stays below 1e-12)."""
    recipe = config.preset("seed-report").replace(dataset="digits", width=4, image_size=16)
    lone = [_build(recipe, s, torch.float64) for s in SEEDS]
    packed = pack(lone)
    x = digits.train_x[:32]
    assert packed.resize == "pil"
    for model in lone:
        assert torch.equal(packed.preprocess(x), model.preprocess(x))
    with torch.no_grad():
        want = packed.eval()(x)
        for i, model in enumerate(lone):
            torch.testing.assert_close(model.eval()(x), want[i], rtol=0, atol=1e-12)


def test_packed_gradient_is_each_networks_lone_gradient(digits):
    recipe, _rt, dd = _setup(digits)
    lone = [_build(recipe, s) for s in SEEDS]
    packed = pack(lone)
    x, y = dd.train_x[:64], dd.train_y[:64]
    sum(torch.nn.functional.cross_entropy(z, y) for z in packed(x)).backward()
    grads = {n: p.grad for n, p in packed.named_parameters()}
    for i, model in enumerate(lone):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            g = grads[name]
            g = g[i] if name.startswith("net.fc.") else g.chunk(len(SEEDS))[i]
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_packed_one_test_pass_is_each_networks_per_epoch_result(digits):
    """test_each_epoch=False, packed: one test pass on each network's selected weights
    gives what a per-epoch pass gave at that network's selected epoch."""
    out = {}
    for each in (True, False):
        recipe, rt, dd = _setup(digits, epochs=4, test_each_epoch=each)
        packed = pack([_build(recipe, s) for s in SEEDS])
        out[each] = packed, fit(packed, [CrossEntropy()] * len(SEEDS), dd, recipe, rt, log=io.StringIO())
    (p_each, each), (p_once, once) = out[True], out[False]
    assert any(r.best_epoch < 4 for r in each), "some network must select an earlier epoch"
    for a, b in zip(each, once, strict=True):
        assert b.best_epoch == a.best_epoch and b.best_test_acc == a.history[a.best_epoch - 1]["test_acc"]
        assert all("test_acc" not in h for h in b.history)
    for k, v in p_each.state_dict().items():  # both leave with their last epoch's weights
        assert torch.equal(v, p_once.state_dict()[k]), k


class _Crash(Exception):
    pass


def test_an_interrupted_packed_wave_resumes_bit_for_bit(digits, tmp_path):
    """Killed after epoch 2 of 4 (a crash while saving stands in for kill -9), the wave
    continues from its checkpoint: every network ends with the weights, history and
    selection of an uninterrupted wave, whatever weights the new process built."""
    from kd_mlflow.checkpoint import CheckpointStore

    class CrashAfter(CheckpointStore):
        def save(self, state):
            path = super().save(state)
            if state["epoch"] == 2:
                raise _Crash
            return path

    recipe, rt, dd = _setup(digits, epochs=4, augment=True, schedule="onecycle")

    def wave(store, seed_shift=0, log=None):
        packed = pack([_build(recipe, s + seed_shift) for s in SEEDS])
        objectives = [CrossEntropy()] * len(SEEDS)
        return packed, fit(packed, objectives, dd, recipe, rt, log=log or io.StringIO(), checkpoints=store)

    full_packed, full = wave(None)
    with pytest.raises(_Crash):
        wave(CrashAfter(tmp_path / "ckpt"))
    log = io.StringIO()
    packed, resumed = wave(CheckpointStore(tmp_path / "ckpt"), seed_shift=100, log=log)
    assert "resuming after epoch 2" in log.getvalue()
    for k, v in full_packed.state_dict().items():
        assert torch.equal(v, packed.state_dict()[k]), k
    for a, b in zip(full, resumed, strict=True):
        assert (b.best_epoch, b.best_val_acc, b.best_test_acc) == (a.best_epoch, a.best_val_acc, a.best_test_acc)
        assert [h["val_acc"] for h in b.history] == [h["val_acc"] for h in a.history]
        for k, v in a.best_state.items():
            assert torch.equal(v, b.best_state[k]), k


def test_pack_refuses_networks_of_different_shapes_or_preprocessing():
    a = models.build(config.preset("smoke"), 10)
    for other in ({"width": 8}, {"resize": "pil"}, {"mean": (0.4, 0.5, 0.5)}):
        b = models.build(config.preset("smoke").replace(**other), 10)
        with pytest.raises(ValueError):
            pack([a, b])


# --- the packed path through the CLI: each network its own run, reused by lone runs -----


@pytest.mark.e2e
def test_train_seeds_pack_logs_runs_a_lone_run_reuses(tracked):
    from conftest import run_cli

    from kd_mlflow import schema

    packed = run_cli("train", "--seeds", "0-1", "--pack", "--preset", "smoke", "--epochs", "3", env=tracked.env)
    assert packed.returncode == 0, packed.stderr[-3000:]
    ids = packed.stdout.strip().splitlines()[-2:]
    runs = {r.info.run_id: r for r in tracked.runs()}
    assert set(runs) == set(ids) and all(r.info.status == "FINISHED" for r in runs.values())
    for seed, rid in zip((0, 1), ids, strict=True):
        r = runs[rid]
        assert r.info.run_name == f"train-seed-{seed}" and r.data.tags[schema.PACKED] == "2"
        assert r.data.metrics[schema.FINAL_TEST_ACC] > 0 and r.data.tags.get(schema.PREDICTIONS)
    lone = run_cli("train", "--seed", "1", "--preset", "smoke", "--epochs", "3", env=tracked.env)
    assert lone.returncode == 0 and lone.stdout.strip().splitlines()[-1] == ids[1]
    assert "reusing finished run" in lone.stderr and len(tracked.runs()) == 2


@pytest.mark.e2e
def test_reproduce_pack_is_the_study_a_lone_reproduce_reuses(tracked):
    """`reproduce --pack`: the seeds and the SD students as packed waves, each student
    with its own teacher; a lone `reproduce` of the same study then trains nothing."""
    from conftest import run_cli

    from kd_mlflow import schema

    packed = run_cli("reproduce", "--preset", "smoke", "--seeds", "0-1", "--pack", "--no-register", env=tracked.env)
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "7 step(s) ran, 0 reused" in packed.stderr
    runs = [r for r in tracked.runs() if r.data.tags.get(schema.STUDY) != "true"]
    assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs)
    by_name = {r.info.run_name: r for r in runs}
    for name in ("train-seed-0", "train-seed-1", "sd-t0-s10", "sd-t1-s11"):
        assert by_name[name].data.tags[schema.PACKED] == "2", name
    assert schema.PACKED not in by_name["kd-seed-100"].data.tags  # the KD student trains alone
    for t, s in ((0, 10), (1, 11)):  # each SD student learned from its own teacher
        assert by_name[f"sd-t{t}-s{s}"].data.tags[schema.TEACHER_RUN_ID] == by_name[f"train-seed-{t}"].info.run_id

    lone = run_cli("reproduce", "--preset", "smoke", "--seeds", "0-1", "--no-register", env=tracked.env)
    assert lone.returncode == 0, lone.stderr[-3000:]
    assert "0 step(s) ran, 7 reused" in lone.stderr
