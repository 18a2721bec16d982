"""Pure pieces on tiny inputs: recipes, the split, augmentation, losses, ensembles,
checkpoints and bitwise resume. No MLflow."""

from __future__ import annotations

import io
import math
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kd_mlflow import config, data, models, schema
from kd_mlflow.checkpoint import CheckpointStore, CorruptCheckpoint, dump, parse
from kd_mlflow.config import ConfigError
from kd_mlflow.ensemble import Ensemble
from kd_mlflow.objectives import CachedTeacher, Distillation, OnlineTeacher, kd_loss, teacher_table
from kd_mlflow.train import fit, make_runtime

# --- recipes -----------------------------------------------------------------


def test_presets_are_valid_and_seed_report_is_the_reports_recipe():
    r = config.preset("seed-report")
    assert (r.model, r.image_size, r.mean, r.std) == ("resnet18", 224, (0.5,) * 3, (0.5,) * 3)
    assert (r.optimizer, r.lr, r.batch_size, r.epochs, r.augment) == ("adam", 1e-3, 128, 100, False)
    assert (r.split_seed, r.order_seed, r.val_size, r.temperature, r.alpha) == (42, 42, 5000, 1.0, 1.0)
    # The report's mechanisms (tests/test_fidelity.py shows each against torch/torchvision).
    assert (r.precision, r.split_style, r.order_style, r.init_style, r.resize, r.distill_loss, r.student_init_skip) == (
        "fp32",
        "random_split",
        "dataloader",
        "torchvision-fc",
        "pil",
        "soft-ce",
        1,
    )
    assert r == config.Recipe() and config.study_kd_seeds("seed-report") == [42]
    # Every other preset keeps kd-mlflow's own mechanisms, so its results do not change.
    for name in ("standard", "cpu-demo", "smoke"):
        p = config.preset(name)
        assert {k: getattr(p, k) for k in config.OWN_MECHANISMS} == config.OWN_MECHANISMS, name
        assert p.precision == "auto" and config.study_kd_seeds(name) == [100]
    digests = {config.preset(n).digest() for n in config.PRESETS}
    assert len(digests) == len(config.PRESETS)
    assert r.digest() != r.replace(resize="float").digest()
    assert r.digest("student") != r.replace(student_init_skip=0).digest("student")


def test_identity_is_role_shaped():
    """A teacher's identity never holds a student's settings; every constant that changes
    a result is a field, in the digest and in the params."""
    r = config.preset("standard")
    for field, value in (("temperature", 2.0), ("alpha", 0.5), ("distill_loss", "soft-ce"), ("student_init_skip", 1)):
        other = r.replace(**{field: value})
        assert other.digest("train") == r.digest("train"), field
        assert other.digest("student") != r.digest("student"), field
        assert field not in r.as_params("train") and field in r.as_params("student")
    for field, value in (("nesterov", False), ("warmup", 0.3), ("crop_padding", 2), ("epochs", 1)):
        assert r.replace(**{field: value}).digest("train") != r.digest("train"), field
        assert field in r.as_params("train")
    assert r.replace(eval_batch_size=7).digest("student") == r.digest("student")
    assert r.replace(test_each_epoch=False).digest("student") == r.digest("student")
    assert config.group_label("smoke", config.resolve("smoke", epochs=1), "train") == "smoke · epochs=1"
    assert config.group_label("smoke", config.resolve("smoke", temperature=2.0), "train") == "smoke"
    assert config.group_label("smoke", config.resolve("smoke", temperature=2.0), "student") == "smoke · temperature=2.0"
    for field in ("split_style", "order_style", "init_style", "resize", "distill_loss", "student_init_skip"):
        assert field in r.as_params()


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0),
        ("lr", -1.0),
        ("epochs", 0),
        ("batch_size", 0),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("temperature", 0.0),
        ("model", "vgg"),
        ("dataset", "mnist"),
        ("width", 0),
        ("split_seed", -1),
        ("split_style", "tail"),
        ("order_style", "sampler"),
        ("init_style", "kaiming"),
        ("resize", "nearest"),
        ("distill_loss", "mse"),
        ("student_init_skip", -1),
    ],
)
def test_bad_recipe_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        config.resolve("smoke", **{field: value})
    assert e.value.name == field and repr(value) in str(e.value)


def test_a_study_is_named_for_what_it_changes_and_seeds_other_than_the_default():
    assert schema.study_name("smoke", "digits") == "study-smoke-digits"
    changed = schema.study_name("smoke", "digits", "smoke · epochs=3", [0, 1, 2])
    assert changed == "study-smoke-digits-epochs=3-seeds=0-2"
    assert schema.study_name("smoke", "digits", "smoke", [0, 2, 5]) == "study-smoke-digits-seeds=0_2_5"


def test_parse_seeds():
    assert config.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert config.parse_seeds("3,1") == [3, 1]
    for bad in ("a", "1,1", "-1", ""):
        with pytest.raises(ConfigError):
            config.parse_seeds(bad)


def test_recipe_round_trips_through_params():
    for name in config.PRESETS:
        r = config.preset(name)
        assert config.recipe_from_params(r.as_params()) == r


def test_a_run_logged_before_the_mechanism_fields_rebuilds_with_the_old_mechanisms():
    old = {
        k: v
        for k, v in config.preset("seed-report").replace(precision="auto").as_params().items()
        if k not in config.OWN_MECHANISMS
    }
    r = config.recipe_from_params(old)
    assert {k: getattr(r, k) for k in config.OWN_MECHANISMS} == config.OWN_MECHANISMS
    assert r.precision == "auto" and r.image_size == 224


# --- data --------------------------------------------------------------------


def _write_cifar10(root, n_per_batch=20):
    """A tiny dataset in CIFAR-10's on-disk format (python pickles of uint8 rows)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name, n, offset):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + offset) % 10 for i in range(n)]
        with open(base / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)
        return rows, labels

    train = [batch(f"data_batch_{i}", n_per_batch, i) for i in range(1, 6)]
    test = batch("test_batch", n_per_batch, 0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return train, test


def test_cifar10_through_torchvision_offline(tmp_path):
    train, _test = _write_cifar10(tmp_path)
    src = data.load("cifar10", str(tmp_path), tmp_path / "cache")
    assert src.train_x.shape == (100, 3, 32, 32) and src.train_x.dtype == torch.uint8
    assert src.test_x.shape == (20, 3, 32, 32) and src.num_classes == 10
    # CIFAR rows are channel-major 32x32 planes: the first image's red plane is row[:1024].
    assert torch.equal(src.train_x[0, 0].flatten(), torch.from_numpy(train[0][0][0, :1024]))
    assert src.train_y.tolist()[:3] == train[0][1][:3]


def _write_folder(root, classes=("cat", "dog", "emu"), n=6, size=8):
    rng = np.random.default_rng(1)
    for part in ("train", "test"):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / part / c / f"{i}.png"
                )


def test_folder_tree_and_its_archive_decode_the_same(tmp_path):
    _write_folder(tmp_path / "tree")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    a = data.load("folder", str(tmp_path / "tree"), tmp_path / "c1")
    b = data.load("folder", str(tmp_path / "tree.tar.gz"), tmp_path / "c2")
    assert a.classes == ("cat", "dog", "emu") and a.train_x.shape == (18, 3, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    again = data.load("folder", str(tmp_path / "tree"), tmp_path / "c1")  # from the cache
    assert torch.equal(a.train_x, again.train_x)


def test_digits_are_decoded_once_and_read_back_without_scikit_learn(tmp_path, monkeypatch):
    fresh = data.load("digits", cache_dir=tmp_path)
    (cached,) = (tmp_path / "decoded").glob("digits-sklearn-*.pt")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now fails
    again = data.load("digits", cache_dir=tmp_path)
    assert (again.name, again.location, again.classes) == (fresh.name, fresh.location, fresh.classes)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, k), getattr(fresh, k)) and getattr(again, k).dtype == getattr(fresh, k).dtype
    cached.unlink()
    with pytest.raises(ImportError):  # the cache was read, not scikit-learn
        data.load("digits", cache_dir=tmp_path)


def test_folder_with_mismatched_classes_is_refused(tmp_path):
    _write_folder(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "emu").rename(tmp_path / "tree" / "test" / "owl")
    with pytest.raises(ConfigError, match="different classes"):
        data.load("folder", str(tmp_path / "tree"), tmp_path / "c")


def test_split_depends_on_the_split_seed_only():
    src = data.load("digits")
    r = config.preset("smoke")
    a, b = data.make_split(src, r), data.make_split(src, r.replace(lr=0.5, order_seed=7))
    assert torch.equal(a.val_idx, b.val_idx) and a.digest == b.digest
    c = data.make_split(src, r.replace(split_seed=1))
    assert c.digest != a.digest
    assert not set(a.val_idx.tolist()) & set(a.train_idx.tolist())


def test_eval_batches_refuse_an_unknown_set():
    r, src, _split, _rt, dd = _smoke_setup()
    assert sum(len(b.y) for b in dd.eval_batches("val", 64)) == r.val_size
    assert sum(len(b.y) for b in dd.eval_batches("test", 64)) == len(src.test_y)
    with pytest.raises(ValueError, match="'val' or 'test'"):
        next(dd.eval_batches("train", 64))


def test_crop_flip_is_a_per_image_shift_and_mirror():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    same = data.crop_flip(x, torch.tensor([[4, 4], [4, 4]]), torch.tensor([False, True]), 4)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(-1))
    shifted = data.crop_flip(x, torch.tensor([[5, 4], [4, 4]]), torch.tensor([False, False]), 4)
    assert torch.equal(shifted[0, :, :4], x[0, :, 1:]) and shifted[0, :, 4].eq(0).all()


# --- objectives and ensembles ------------------------------------------------


def test_kd_loss_golden_values():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    assert kd_loss(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    p, q = t.softmax(1), s.softmax(1)
    kl = (p * (p.log() - q.log())).sum().item()
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl, rel=1e-5)
    p4, q4 = (t / 4).softmax(1), (s / 4).softmax(1)
    kl4 = (p4 * (p4.log() - q4.log())).sum().item()
    assert kd_loss(s, t, 4.0).item() == pytest.approx(16 * kl4, rel=1e-5)  # scaled by T^2


def test_kd_loss_does_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(kd_loss(s.repeat(8, 1), t.repeat(8, 1), 2.0).item(), rel=1e-6)


def test_kd_loss_at_t1_has_the_gradient_of_soft_target_cross_entropy():
    s = torch.randn(5, 10, requires_grad=True)
    t = torch.randn(5, 10)
    kd_loss(s, t, 1.0).backward()
    g_kd = s.grad.clone()
    s.grad = None
    (-(t.softmax(1) * s.log_softmax(1)).sum(1).mean()).backward()
    assert torch.allclose(g_kd, s.grad, atol=1e-6)


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def test_ensemble_of_one_is_that_model_and_averages_probabilities():
    a, b = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])
    x = torch.zeros(1, 3, 2, 2)
    one = Ensemble([_Fixed(a)])
    assert torch.allclose(one(x).softmax(1), a.softmax(1), atol=1e-6)
    both = Ensemble([_Fixed(a), _Fixed(b)])
    assert torch.allclose(both(x).softmax(1), (a.softmax(1) + b.softmax(1)) / 2, atol=1e-6)
    # Averaging logits is a different ensemble: check the two really differ here.
    assert not torch.allclose(Ensemble([_Fixed(a), _Fixed(b)], "logit")(x).softmax(1), both(x).softmax(1), atol=1e-3)
    assert both(x).exp().sum().item() == pytest.approx(1.0, rel=1e-6) and math.isfinite(both(x).sum())


def _smoke_setup(**over):
    r = config.preset("smoke").replace(**over)
    src = data.load("digits")
    split = data.make_split(src, r)
    rt = make_runtime(r, "cpu")
    return r, src, split, rt, data.DeviceData(src, split, rt.device)


def test_cached_and_on_the_fly_teacher_give_the_same_loss():
    r, _src, _split, rt, dd = _smoke_setup()
    torch.manual_seed(0)
    teacher = models.build(r, 10).eval()
    torch.manual_seed(1)
    student = models.build(r, 10)
    cached = Distillation(CachedTeacher(teacher_table(teacher, dd, rt.autocast, 128)), 2.0, 0.7)
    online = Distillation(OnlineTeacher(teacher, rt.autocast), 2.0, 0.7)
    batch = next(dd.train_batches(r, torch.Generator().manual_seed(3)))  # smoke: 64, no augmentation
    student.eval()
    logits = student(batch.x)
    assert torch.allclose(cached(logits, batch), online(logits, batch), atol=1e-6)


# --- checkpoints and resume ----------------------------------------------------


def test_checkpoint_detects_truncation_and_bit_flips(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"epoch": 1, "w": torch.ones(3)})
    store.save({"epoch": 2, "w": torch.full((3,), 2.0)})
    latest = sorted(tmp_path.glob("*.ckpt"))[-1]
    blob = bytearray(latest.read_bytes())
    blob[-5] ^= 0x01
    latest.write_bytes(bytes(blob))
    assert store.load_latest()["epoch"] == 1  # falls back to the previous good one
    latest.write_bytes(bytes(blob[:20]))
    assert store.load_latest()["epoch"] == 1
    for f in tmp_path.glob("*.ckpt"):
        f.write_bytes(b"")
    assert store.load_latest() is None  # starts clean
    with pytest.raises(CorruptCheckpoint):
        parse(dump({"epoch": 1})[:-1])


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/kd-mlflow-pwned",))


def test_checkpoint_never_runs_pickle_code(tmp_path):
    import io
    import os

    buf = io.BytesIO()
    torch.save({"epoch": 1, "evil": _Payload()}, buf)
    payload = buf.getvalue()
    import hashlib

    blob = b"KDCKPT01" + hashlib.sha256(payload).digest() + payload  # a valid checksum, evil inside
    if os.path.exists("/tmp/kd-mlflow-pwned"):
        os.remove("/tmp/kd-mlflow-pwned")
    with pytest.raises(CorruptCheckpoint, match="refused"):
        parse(blob)
    assert not os.path.exists("/tmp/kd-mlflow-pwned")


def _fit(epochs, store=None, init_seed=0):
    r, _src, _split, rt, dd = _smoke_setup(
        epochs=epochs, schedule="onecycle", augment=True, train_subset=256, batch_size=32
    )
    torch.manual_seed(init_seed)
    model = models.build(r, 10)
    from kd_mlflow.objectives import CrossEntropy

    return model, fit(model, [CrossEntropy()], dd, r, rt, None, store)[0]


class _Crash(Exception):
    pass


class _CrashAfter(CheckpointStore):
    """Saves like the real store, then dies after epoch ``k`` (a kill -9 stand-in)."""

    def __init__(self, directory, k):
        super().__init__(directory)
        self.k = k

    def save(self, state):
        path = super().save(state)
        if state["epoch"] == self.k:
            raise _Crash
        return path


class _Lossy(CheckpointStore):
    """Loads a checkpoint with one piece of state replaced by a fresh one."""

    def __init__(self, directory, drop):
        super().__init__(directory)
        self.drop = drop

    def load_latest(self):
        snap = super().load_latest()
        if self.drop == "optimizer":
            snap["optimizer"]["state"] = {}
        elif self.drop == "scheduler":
            snap["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1
            ).state_dict() | {k: v for k, v in snap["scheduler"].items() if k not in ("last_epoch", "_step_count")}
        elif self.drop == "order_rng":
            snap["order_rng"] = torch.Generator().manual_seed(42).get_state()
        return snap


def _resumed(tmp_path, store):
    with pytest.raises(_Crash):
        _fit(6, _CrashAfter(tmp_path / "ckpt", 4))
    # The resumed process builds its model from another seed: every bit of state must
    # come from the checkpoint.
    return _fit(6, store, init_seed=123)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full_model, full = _fit(6)
    model, res = _resumed(tmp_path, CheckpointStore(tmp_path / "ckpt"))
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert [h["val_acc"] for h in res.history] == [h["val_acc"] for h in full.history]


@pytest.mark.parametrize("piece", ["optimizer", "scheduler", "order_rng"])
def test_resume_test_can_fail_without_each_piece_of_state(tmp_path, piece):
    full_model, _ = _fit(6)
    model, _ = _resumed(tmp_path, _Lossy(tmp_path / "ckpt", piece))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in full_model.state_dict().items())


def test_a_teachers_table_is_computed_once_per_teacher_and_split(tmp_path):
    from kd_mlflow import steps

    ex = steps.Execution(cache_dir=tmp_path)
    rt = make_runtime(config.preset("smoke"), "cpu")
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12, dtype=torch.float32).view(4, 3)

    first = steps._teacher_table("t" * 32, "split-a", ex, rt, compute)
    again = steps._teacher_table("t" * 32, "split-a", ex, rt, compute)
    assert len(calls) == 1 and torch.equal(first, again)
    steps._teacher_table("t" * 32, "split-b", ex, rt, compute)  # another split: its own table
    assert len(calls) == 2
    for f in (tmp_path / "teacher-tables").iterdir():
        f.write_bytes(f.read_bytes()[:-5])  # truncated: refused, recomputed
    steps._teacher_table("t" * 32, "split-a", ex, rt, compute)
    assert len(calls) == 3


def test_one_test_pass_on_the_selected_weights_is_the_per_epoch_result():
    """test_each_epoch=False: no test pass per epoch, one on the selected weights; the
    run's result is the test accuracy a per-epoch pass gave at the selected epoch."""
    runs = {}
    for each in (True, False):
        r, _src, _split, rt, dd = _smoke_setup(epochs=4, test_each_epoch=each)  # selects epoch 3
        torch.manual_seed(0)
        model = models.build(r, 10)
        from kd_mlflow.objectives import CrossEntropy

        runs[each] = model, fit(model, [CrossEntropy()], dd, r, rt, None, None, log=io.StringIO())[0]
    (m_each, each), (m_once, once) = runs[True], runs[False]
    assert each.best_epoch < 4, "this recipe must select an earlier epoch for the test to tell"
    assert once.best_epoch == each.best_epoch and once.best_val_acc == each.best_val_acc
    assert once.best_test_acc == each.history[each.best_epoch - 1]["test_acc"] == each.best_test_acc
    assert once.best_test_acc != each.history[-1]["test_acc"]
    assert all("test_acc" not in h for h in once.history)
    assert [{k: v for k, v in h.items() if k not in ("test_acc", "epoch_seconds")} for h in each.history] == [
        {k: v for k, v in h.items() if k != "epoch_seconds"} for h in once.history
    ]
    for k, v in m_each.state_dict().items():  # both leave with the last epoch's weights
        assert torch.equal(v, m_once.state_dict()[k]), k


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--augment", "true"], {"augment": True}),  # `mlflow run -P augment=true`
        (["--augment", "false"], {"augment": False}),
        (["--augment"], {"augment": True}),
        (["--no-augment"], {"augment": False}),
        (["--test_each_epoch", "false"], {"test_each_epoch": False}),
        (["--augment", ""], {}),  # `-P augment=`: not given
        ([], {}),
    ],
)
def test_boolean_recipe_fields_take_every_spelling(argv, expected):
    from kd_mlflow import cli

    ctx = cli.train.make_context("train", ["--seed", "0", *argv])
    got = cli._overrides(ctx.params)
    assert {k: v for k, v in got.items() if k in ("augment", "test_each_epoch")} == expected


def test_a_bad_or_contradicting_boolean_is_a_usage_error():
    from conftest import invoke

    res = invoke("train", "--seed", "0", "--preset", "smoke", "--augment", "maybe")
    assert res.exit_code == 2 and "'maybe'" in res.stderr and "Traceback" not in res.stderr
    res = invoke("train", "--seed", "0", "--preset", "smoke", "--augment", "--no-augment")
    assert res.exit_code == 2 and "--augment and --no-augment contradict" in res.stderr


@pytest.mark.parametrize("command", ["train", "distill", "joint", "reproduce"])
def test_every_recipe_field_is_an_option_read_as_its_logged_param(command):
    """The commands' recipe options are the recipe's fields (one declaration), each read
    by config as a run's logged param is: a recipe's params typed as flags give it back."""
    from kd_mlflow import cli

    recipe = config.preset("cpu-pairs").replace(augment=True, mean=(0.25, 0.5, 0.75))
    required = {"distill": ["--teacher", "a" * 32, "--seed", "0"], "joint": ["--seeds", "0-1"]}.get(command, [])
    flags = [a for k, v in recipe.as_params().items() for a in (f"--{k.replace('_', '-')}", v)]
    ctx = cli.main.commands[command].make_context(command, [*required, *flags])
    assert config.Recipe(**cli._overrides(ctx.params)) == recipe


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--epochs", "two"),
        ("--lr", "abc"),
        ("--optimizer", "adamw"),
        ("--augment", "maybe"),
        ("--mean", "0.5,0.5"),
        ("--std", "a,b,c"),
        ("--milestones", "60,,120"),
        ("--milestones", "5.5"),
    ],
)
def test_a_typed_value_is_refused_for_the_reason_its_logged_text_would_be(flag, text):
    """One reading per value (config's): the CLI refuses a flag's text for the reason
    config gives that field's text logged by a run, exit 2."""
    from conftest import invoke

    with pytest.raises(config.ConfigError) as refused:
        config.field_value(flag[2:], text)
    res = invoke("train", "--seed", "0", "--preset", "smoke", flag, text)
    assert res.exit_code == 2 and res.stderr.strip().endswith(f"{text!r} is {refused.value.reason}"), res.stderr


@pytest.mark.parametrize("name", ["KD_MLFLOW_NETWORK_TIMEOUT", "KD_MLFLOW_CLAIM_LEASE"])
def test_seconds_from_the_environment_are_read_in_one_place(name, monkeypatch):
    """The network bound and the claims' lease: one reader, the same refusals."""
    from kd_mlflow import waits
    from kd_mlflow.tracking import claims

    read = {"KD_MLFLOW_NETWORK_TIMEOUT": waits.timeout, "KD_MLFLOW_CLAIM_LEASE": claims.lease}[name]
    monkeypatch.delenv(name, raising=False)
    assert read() in (waits.DEFAULT_TIMEOUT, claims.DEFAULT_LEASE)
    monkeypatch.setenv(name, " 2.5 ")
    assert read() == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError) as e:
            read()
        assert e.value.name == name


def test_what_an_ensembles_predictions_say_is_what_evaluating_it_says():
    """The ensemble step reads its accuracies and validation loss off the predictions it
    logs (one pass over the images, not two): the same figures as evaluate_all's."""
    from kd_mlflow import data, models, steps
    from kd_mlflow.ensemble import Ensemble
    from kd_mlflow.train import evaluate_all, make_runtime

    class Logged:  # what _log_predictions hands a run: kept here to look at
        def log_predictions(self, *arrays, pred_val, pred_test):
            self.pred_test = pred_test

    recipe = config.PRESETS["smoke"]
    digits = data.load("digits")
    rt = make_runtime(recipe, "cpu")
    dd = data.DeviceData(digits, data.make_split(digits, recipe), rt.device)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(models.build(recipe, digits.num_classes))
    model = rt.prepare(Ensemble(members))
    want = evaluate_all(model, dd, recipe, rt)
    rec = Logged()
    _, got = steps._log_predictions(rec, model, dd, recipe, rt)
    assert (got["val_acc"], got["test_acc"]) == (want["val_acc"], want["test_acc"])
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert len(rec.pred_test) == len(digits.test_y)
