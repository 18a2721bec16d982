"""bfloat16 on CPUs that compute it natively: which runs resolve to it, that their
identity and group say so, and that losses and metrics stay float32 under autocast.
The CPU's capability probe (machine.native_bf16) is the one thing mocked: the test
machine's processor must not decide what these tests check."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke

from kd_mlflow import config, data, machine, models, schema, train
from kd_mlflow.objectives import CrossEntropy, teacher_table
from kd_mlflow.train import Runtime, evaluate_stacked, make_runtime, plan_run, predict

NOT_CPU_BF16 = [p for p in config.PRESETS if p not in config.CPU_BF16_PRESETS]


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native(request, monkeypatch) -> bool:
    monkeypatch.setattr(machine, "native_bf16", lambda: request.param)
    return request.param


# --- which runs resolve to bf16 ---------------------------------------------------


@pytest.mark.parametrize("preset", config.CPU_BF16_PRESETS)
def test_a_cpu_preset_resolves_to_bf16_only_where_the_cpu_has_it(preset, native):
    recipe = plan_run(config.PRESETS[preset], preset, "cpu")
    want = "bf16" if native else "fp32"
    assert make_runtime(recipe, "cpu").precision == want
    # float32 keeps "auto": the identity of every CPU run made before bf16 on CPUs
    assert recipe.precision == ("bf16" if native else "auto")


@pytest.mark.parametrize("preset", NOT_CPU_BF16)
def test_other_presets_stay_float32_on_any_cpu(preset, native):
    """smoke (the suite's pinned numbers) and the fidelity and GPU presets."""
    recipe = plan_run(config.PRESETS[preset], preset, "cpu")
    assert recipe == config.PRESETS[preset]
    assert make_runtime(recipe, "cpu").precision == "fp32"


def test_a_precision_the_user_chose_is_kept(native):
    chosen = config.PRESETS["cpu-converge"].replace(precision="fp32")
    assert plan_run(chosen, "cpu-converge", "cpu") == chosen


@pytest.mark.parametrize(
    ("flags", "native_bf16"),
    [("fpu avx512f avx512_bf16 amx_tile", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2 avx512f", False)],
)
def test_native_bf16_reads_the_cpus_flags(tmp_path, flags, native_bf16):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert machine.native_bf16(cpuinfo) is native_bf16
    assert machine.native_bf16(tmp_path / "absent") is False


# --- identity: runs of different resolved precision never share a group -------------

# cpu-pairs' recipe at smoke's size (the bundled digits, seconds)
TINY_PAIRS = ["--preset", "cpu-pairs", "--dataset", "digits", "--image-size", "8", "--epochs", "1"]
TINY_PAIRS += ["--val-size", "200", "--train-subset", "128", "--model", "resnet8", "--width", "4"]


def _train(monkeypatch, native_bf16: bool) -> mlflow.entities.Run:
    monkeypatch.setattr(machine, "native_bf16", lambda: native_bf16)
    res = invoke("train", "--seed", "0", "--device", "cpu", *TINY_PAIRS)
    assert res.exit_code == 0, res.output[-2000:]
    return mlflow.get_run(res.stdout.strip().splitlines()[-1])


def test_bf16_and_fp32_runs_of_one_recipe_are_two_groups(tracked, monkeypatch):
    bf16, fp32 = _train(monkeypatch, True), _train(monkeypatch, False)
    assert bf16.info.run_id != fp32.info.run_id  # the fp32 run was not the bf16 run reused
    assert (bf16.data.tags[schema.PRECISION_RESOLVED], fp32.data.tags[schema.PRECISION_RESOLVED]) == ("bf16", "fp32")
    assert bf16.data.tags[schema.GROUP] != fp32.data.tags[schema.GROUP]
    assert bf16.data.tags[schema.CONFIG_HASH] != fp32.data.tags[schema.CONFIG_HASH]
    assert "precision=bf16" in bf16.data.tags[schema.GROUP_LABEL].split(" · ")
    assert "precision" not in fp32.data.tags[schema.GROUP_LABEL]
    assert fp32.data.params["precision"] == "auto"  # as such a run was logged before


def test_a_student_told_precision_auto_trains_as_its_bf16_teacher_did(tracked, monkeypatch):
    """`reproduce --precision auto` on a bf16 CPU trained its teachers in bf16 and its
    students, whose typed auto was not planned for the machine, in float32 under a
    "precision=auto" name. auto is the default: the student is the default one."""
    teacher = _train(monkeypatch, True).info.run_id
    runs = []
    for typed in ([], ["--precision", "auto"]):
        res = invoke("distill", "--teacher", teacher, "--seed", "10", "--device", "cpu", *typed)
        assert res.exit_code == 0, res.output[-2000:]
        runs.append(mlflow.get_run(res.stdout.strip().splitlines()[-1]))
    default, typed_auto = runs
    assert typed_auto.data.tags[schema.PRECISION_RESOLVED] == "bf16"
    assert typed_auto.info.run_id == default.info.run_id  # the same student, reused
    assert "precision" not in typed_auto.info.run_name


# --- float32 losses and metrics under bf16 autocast -------------------------------


@pytest.fixture
def tiny_bf16():
    """smoke's network and digits, under bf16 autocast on the CPU."""
    recipe = config.preset("smoke").replace(train_subset=128, val_size=64)
    source = data.load("digits")
    rt = Runtime(torch.device("cpu"), "bf16")
    torch.manual_seed(0)
    model = rt.prepare(models.build(recipe, source.num_classes))
    return recipe, rt, model, data.DeviceData(source, data.make_split(source, recipe), rt.device)


class _Seen:
    """The real cross-entropy objective, keeping the dtypes it was given and returned."""

    def __init__(self):
        self.logits, self.losses = set(), set()

    def __call__(self, logits, batch):
        loss = CrossEntropy()(logits, batch)
        self.logits.add(logits.dtype)
        self.losses.add(loss.dtype)
        return loss


def test_training_computes_its_loss_in_float32_from_bf16_logits(tiny_bf16):
    recipe, rt, model, dd = tiny_bf16
    seen, steps = _Seen(), []
    optimizer = train.make_optimizer(recipe, model.parameters())
    scheduler = train.make_scheduler(recipe, optimizer, 2)
    order = torch.Generator().manual_seed(0)
    scores = train._train_epoch(model, [seen], dd, recipe, rt, optimizer, scheduler, order, steps.append)
    assert seen.logits == {torch.bfloat16}  # autocast was on around the forward
    assert seen.losses == {torch.float32} and {s.dtype for s in steps} == {torch.float32}
    assert torch.isfinite(scores["train_loss"]).all()


def test_evaluation_and_predictions_are_float32_of_the_bf16_logits(tiny_bf16):
    recipe, rt, model, dd = tiny_bf16
    model.eval()
    with torch.no_grad(), rt.autocast():
        logits = model(dd.val_x)
    assert logits.dtype == torch.bfloat16
    logits = logits.float()
    loss, acc = evaluate_stacked(model, dd, "val", recipe, rt)
    want = F.cross_entropy(logits, dd.val_y).double()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert acc.item() == pytest.approx(100.0 * (logits.argmax(1) == dd.val_y).double().mean().item())
    probs, classes = predict(model, dd, "val", recipe, rt)
    assert probs.dtype == torch.float32 and torch.equal(classes, logits.argmax(1))
    assert torch.allclose(probs, logits.softmax(1), rtol=0, atol=1e-6)
    table = teacher_table(model, dd, rt.autocast, recipe.eval_batch_size)
    assert table.dtype == torch.float32


# --- threads -------------------------------------------------------------------


def test_a_busy_machine_is_said_once_with_its_threads_and_wait_policy(monkeypatch):
    monkeypatch.setattr(machine, "_said", False)
    monkeypatch.setattr(machine, "_load", lambda: 9.5)
    monkeypatch.setattr(machine, "_cpus", lambda: 2)
    monkeypatch.setenv("KD_MLFLOW_THREADS", "1")  # a count the user chose: nothing to say
    assert machine.busy_note() is None
    monkeypatch.delenv("KD_MLFLOW_THREADS")
    note = machine.busy_note()
    assert note is not None and "\n" not in note
    assert f"{torch.get_num_threads()} torch thread(s)" in note and "load 9.5 on 2 CPUs" in note
    assert machine.busy_note() is None  # once per process


def test_threads_sleep_at_once_beside_runnable_processes_and_spin_briefly_on_a_quiet_machine():
    import kd_mlflow

    assert kd_mlflow.openmp_waits(0.0) == {"GOMP_SPINCOUNT": "10000"}
    assert kd_mlflow.openmp_waits(0.4) == {"GOMP_SPINCOUNT": "10000"}  # a passing shell
    assert kd_mlflow.openmp_waits(1.0) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.e2e  # fresh interpreters, and processes that spin
def test_kd_mlflow_decides_the_wait_policy_before_torch_loads_from_the_processes_beside_it():
    """OpenMP reads it once, at load: the package decides it on import; beside busy
    processes the threads sleep; the user's choice is kept."""
    import subprocess
    import sys

    code = "import os, kd_mlflow, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert out.stdout.split() == ["PASSIVE", "None"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "None"]


def test_a_study_of_a_cpu_preset_at_this_cpus_precision_runs_its_own_recipe(native):
    """The champion alias follows the preset's own recipe as this CPU trains it; a
    precision chosen against the CPU (bf16 typed where it is not native) is not it."""
    from kd_mlflow.study import Plan

    planned = plan_run(config.PRESETS["cpu-converge"], "cpu-converge", "cpu")
    assert Plan("cpu-converge", planned, {}, [0, 1]).own_recipe
    typed = config.PRESETS["cpu-converge"].replace(precision="bf16")
    assert Plan("cpu-converge", typed, {"precision": "bf16"}, [0, 1]).own_recipe is native
    other = config.PRESETS["cpu-converge"].replace(epochs=3)
    assert not Plan("cpu-converge", other, {"epochs": 3}, [0, 1]).own_recipe
