"""Parity: every path a run can take trains what the lone run in this process trains.

What this guards against (issue 18): packed training was once a second copy of the loop
that passed the recipe's batch size and augmentation on, but not its ``order_style``,
``crop_padding`` or ``resize``; `train --seeds 0-4 --pack` on seed-report logged runs
under seed-report's identity that were trained on another batch order and other pixels.

The mechanisms of every preset, at a tiny size on the 8x8 digits (no network):

- seed-report's: random_split, the DataLoader's batch order, torchvision's resnet18 with
  a new fc, PIL's rounded resize (8 -> 16 pixels here), Adam;
- standard's: crop + flip on the device, SGD with Nesterov momentum, weight decay, cosine;
- cpu-converge's: one-cycle, one test pass on the selected weights (test_each_epoch false).

Each path is compared with (a), the lone network trained in this process: (b) packed
with another network (K = 2); (c) interrupted after epoch 1's checkpoint and resumed
from weights of another seed; (b') `train --seeds 0-1 --pack`, the command; (d) a
train step in a `kd-mlflow _step` process, as `reproduce --jobs N` runs it; (e) `mlflow run . -e train
--env-manager local`. Each gives every step's loss within 1e-4 of (a), the same selection
and, where it logs a run, the lone run's identity.

(a)-(c) train in float64: packed and lone convolutions round differently in float32 and
at these learning rates such differences grow chaotically (standard's by 1e-2 within a
dozen steps; tests/test_pack.py says more), while in float64 they stay far below the
tolerance. The commands (b'), (d) and (e) train in float32, as every run does, and are
compared with (a) in float32. A process costs ~8 s of imports, so only seed-report's
mechanisms (the preset that drifted) take (d) and (e). The kill -9 of a real process and
its bitwise resume are tests/test_faults.py's (smoke's mechanisms).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
import uuid

import pytest
import torch
from conftest import REPO, invoke

from kd_mlflow import config, data, models, schema
from kd_mlflow.checkpoint import CheckpointStore
from kd_mlflow.objectives import CrossEntropy
from kd_mlflow.pack import pack
from kd_mlflow.train import FitResult, fit, make_runtime

TOLERANCE = 1e-4  # per-step loss
SEEDS = (0, 1)
TINY = {"dataset": "digits", "width": 4, "train_subset": 128, "val_size": 64, "batch_size": 32, "epochs": 3}
STEPS_PER_EPOCH = 4  # 128 images, 32 a batch
MECHANISMS = {
    "seed-report": ("seed-report", {**TINY, "image_size": 16}),
    "standard": ("standard", {**TINY, "image_size": 8}),
    "cpu-converge": ("cpu-converge", {**TINY, "image_size": 8}),
}
PATHS = ("(a) lone", "(b) packed", "(c) resumed", "(b') --pack", "(d) process", "(e) mlflow run")
MATRIX: dict[str, dict[str, float]] = {}


def _recipe(mechanism: str) -> config.Recipe:
    preset, overrides = MECHANISMS[mechanism]
    return config.resolve(preset, **overrides)


@pytest.fixture(scope="module", autouse=True)
def matrix():
    """Prints mechanism x path -> the largest per-step |loss - (a)'s| (pytest -s shows it)."""
    yield
    print("\nper-step |loss - (a) lone's|, the largest over steps and networks")
    print(f"{'mechanism':<14}" + "".join(f"{p:>16}" for p in PATHS))
    for mechanism, cells in MATRIX.items():
        row = "".join(f"{cells[p]:>16.1e}" if p in cells else f"{'-':>16}" for p in PATHS)
        print(f"{mechanism:<14}{row}")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


class _Interrupted(Exception):
    pass


def _train(digits, recipe, seeds, dtype, losses: list, *, store=None, stop_at=0, seed_shift=0, log=None):
    """The networks of ``seeds``, seeded and built as a run builds them, trained as one
    model: lone for one seed, packed for more. Every step's K losses go to ``losses``;
    the sink raises after epoch ``stop_at``'s metrics (before its checkpoint)."""
    rt = make_runtime(recipe, "cpu")
    dd = data.DeviceData(digits, data.make_split(digits, recipe), rt.device)
    nets = []
    for seed in seeds:
        torch.manual_seed(seed + seed_shift)
        nets.append(models.build(recipe, digits.num_classes).to(dtype))

    def sink(epoch, metrics):
        if epoch == stop_at:
            raise _Interrupted

    model = nets[0] if len(nets) == 1 else pack(nets)
    sinks = [sink] + [None] * (len(seeds) - 1)
    objectives = [CrossEntropy()] * len(seeds)
    return fit(
        model,
        objectives,
        dd,
        recipe,
        rt,
        sinks,
        store,
        log or io.StringIO(),
        on_step=lambda x: losses.append(x.tolist()),
    )


def _gap(got: list, want: list) -> float:
    """The largest per-step |difference| of two trajectories of one network."""
    assert len(got) == len(want) == TINY["epochs"] * STEPS_PER_EPOCH
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def _column(losses: list, i: int) -> list:
    return [step[i] for step in losses]


def _same_selection(got: FitResult, want: FitResult, abs_tol: float = 0.0) -> None:
    assert got.best_epoch == want.best_epoch
    assert got.best_val_acc == pytest.approx(want.best_val_acc, abs=abs_tol)
    assert got.best_test_acc == pytest.approx(want.best_test_acc, abs=abs_tol)


def _lone(digits, recipe, dtype) -> dict:
    """(a): seed -> (its FitResult, its per-step losses)."""
    out = {}
    for seed in SEEDS:
        losses: list = []
        (result,) = _train(digits, recipe, [seed], dtype, losses)
        out[seed] = result, _column(losses, 0)
    return out


def _resumed(digits, recipe, tmp_path):
    """(c): stopped after epoch 2's metrics, so that epoch 1's checkpoint is the last,
    then resumed from weights of another seed; its FitResult and the steps that made it."""
    before: list = []
    with pytest.raises(_Interrupted):
        _train(digits, recipe, [0], torch.float64, before, store=CheckpointStore(tmp_path / "ckpt"), stop_at=2)
    after: list = []
    log = io.StringIO()
    (result,) = _train(
        digits, recipe, [0], torch.float64, after, store=CheckpointStore(tmp_path / "ckpt"), seed_shift=100, log=log
    )
    assert "resuming after epoch 1" in log.getvalue()
    return result, before[:STEPS_PER_EPOCH] + after


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_packed_and_resumed_train_what_the_lone_run_trains(digits, tmp_path, mechanism):
    recipe = _recipe(mechanism)
    lone = _lone(digits, recipe, torch.float64)
    packed_losses: list = []
    packed = _train(digits, recipe, SEEDS, torch.float64, packed_losses)
    resumed, resumed_losses = _resumed(digits, recipe, tmp_path)

    cells = MATRIX.setdefault(mechanism, {})
    cells["(a) lone"] = 0.0
    cells["(b) packed"] = max(_gap(_column(packed_losses, i), lone[s][1]) for i, s in enumerate(SEEDS))
    cells["(c) resumed"] = _gap(_column(resumed_losses, 0), lone[0][1])
    assert all(gap <= TOLERANCE for gap in cells.values()), cells
    for result, seed in zip(packed, SEEDS, strict=True):
        _same_selection(result, lone[seed][0], abs_tol=1e-9)
    _same_selection(resumed, lone[0][0])


# --- the commands: seed-report's mechanisms -------------------------------------


def _cli_args() -> list[str]:
    preset, overrides = MECHANISMS["seed-report"]
    return ["--preset", preset, *(a for k, v in overrides.items() for a in (f"--{k}", str(v)))]


def _settings(experiment: str, losses) -> dict:
    """Where a command logs its run and writes its per-step losses (train._step_losses_file)."""
    return {"MLFLOW_EXPERIMENT_NAME": experiment, "KD_MLFLOW_STEP_LOSSES": str(losses)}


def _env(tracked, experiment: str, losses) -> dict:
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # `python` for mlflow run
    return {**os.environ, **tracked.env, **_settings(experiment, losses), "PATH": path}


def _process(tracked, experiment: str, losses) -> subprocess.Popen:
    """(d): a train step as `reproduce --jobs N` runs it: serialised, in `kd-mlflow _step`."""
    from kd_mlflow import study
    from kd_mlflow.steps import Execution

    preset, overrides = MECHANISMS["seed-report"]
    plan = types.SimpleNamespace(preset=preset, overrides=overrides, data_dir=None)
    job = study.Context(plan, Execution(), None).to_json([study.TrainStep(0)])
    cmd = [sys.executable, "-m", "kd_mlflow", "_step", job]
    return subprocess.Popen(cmd, env=_env(tracked, experiment, losses), cwd=REPO, stderr=subprocess.PIPE, text=True)


def _mlflow_run(tracked, experiment: str, losses) -> subprocess.Popen:
    """(e): `mlflow run . -e train`; its extra parameters become --name value."""
    _, overrides = MECHANISMS["seed-report"]
    params = {"seed": 0, "preset": "seed-report", **overrides}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local"]
    cmd += [a for k, v in params.items() for a in ("-P", f"{k}={v}")] + ["--experiment-name", experiment]
    return subprocess.Popen(cmd, env=_env(tracked, experiment, losses), stderr=subprocess.PIPE, text=True)


def _read_losses(path) -> list:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()]


def _run_of_seed(tracked, experiment: str, seed: int):
    exp = tracked.client.get_experiment_by_name(experiment)
    runs = tracked.client.search_runs([exp.experiment_id], f"params.seed = '{seed}'")
    (run,) = [r for r in runs if r.data.tags.get(schema.ROLE) == "train"]
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.e2e
def test_commands_log_the_lone_identity_and_train_what_it_trains(digits, tracked, tmp_path, monkeypatch):
    recipe = _recipe("seed-report")
    lone = _lone(digits, recipe, torch.float32)
    experiments = {path: f"{tracked.experiment}-{uuid.uuid4().hex[:6]}" for path in PATHS[3:]}
    files = {path: tmp_path / f"losses-{i}.txt" for i, path in enumerate(PATHS[3:])}
    # The two processes run while the packed command runs here.
    started = {
        "(d) process": _process(tracked, experiments["(d) process"], files["(d) process"]),
        "(e) mlflow run": _mlflow_run(tracked, experiments["(e) mlflow run"], files["(e) mlflow run"]),
    }
    for key, value in _settings(experiments["(b') --pack"], files["(b') --pack"]).items():
        monkeypatch.setenv(key, value)
    res = invoke("train", "--seeds", "0-1", "--pack", *_cli_args())
    assert res.exit_code == 0, res.output[-3000:]
    for path, proc in started.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (path, err[-3000:])

    cells = MATRIX.setdefault("seed-report", {})
    runs = {}
    for path, experiment in experiments.items():
        seeds = SEEDS if path == "(b') --pack" else SEEDS[:1]
        losses = _read_losses(files[path])
        cells[path] = max(_gap(_column(losses, i), lone[s][1]) for i, s in enumerate(seeds))
        runs[path] = {seed: _run_of_seed(tracked, experiment, seed) for seed in seeds}
    assert all(cells[path] <= TOLERANCE for path in experiments), cells

    for path, by_seed in runs.items():
        for seed, run in by_seed.items():
            p, m, want = run.data.params, run.data.metrics, lone[seed][0]
            assert p.items() >= recipe.as_params("train").items() and p["seed"] == str(seed), path
            assert (m[schema.BEST_EPOCH], m[schema.FINAL_VAL_ACC]) == (want.best_epoch, want.best_val_acc), path
            assert m[schema.FINAL_TEST_ACC] == pytest.approx(want.best_test_acc, abs=1e-9), path
    identities = [(r[0].data.tags[schema.CONFIG_HASH], r[0].data.params) for r in runs.values()]
    assert all(i == identities[0] for i in identities), [
        (path, r[0].data.tags[schema.CONFIG_HASH], set(r[0].data.params.items()) ^ set(identities[0][1].items()))
        for path, r in runs.items()
    ]
