"""The one training loop. It takes a model of one network or of K packed side by side,
an objective and a metrics sink per network, data, a recipe and a runtime; train, KD
and SD, lone and packed, all run through :func:`fit`."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import machine
from .config import Recipe, cpu_precision
from .models import cpu_copy

# --- device and precision, decided once -----------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "bf16" or "fp32", resolved
    compile: bool = False  # torch.compile the model (GPU runs)
    deterministic: bool = False  # no cudnn autotuning, deterministic kernels

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        # Channels-last where it was measured faster: CUDA, and bf16 on a CPU (oneDNN's
        # bf16 kernels: a cpu-converge training step 1.28x, evaluation 1.51x;
        # benchmarks/cpu_trials.py). Memory layout only: the recipe is the same.
        if self.device.type == "cuda" or self.precision == "bf16":
            model = model.to(memory_format=torch.channels_last)
            for m in model.modules():
                if hasattr(m, "channels_last"):  # models.Classifier: inputs channels-last too
                    m.channels_last = True  # type: ignore[assignment]  # a bool attribute, not a submodule
        return model


def plan_run(recipe: Recipe, preset: str, device: str = "auto") -> Recipe:
    """What the machine changes about a run of ``preset`` on ``device``, decided once, where
    the run is planned (before its identity): on a CPU, the recipe it records and trains,
    where a CPU preset's precision=auto becomes bf16 on a CPU with native bfloat16
    (:func:`kd_mlflow.config.cpu_precision`). A device this machine lacks is refused."""
    machine.check_device(device)
    if torch.device(_pick_device() if device == "auto" else device).type != "cpu":
        return recipe
    return cpu_precision(preset, recipe, machine.native_bf16())


def _say_threads() -> None:
    note = machine.busy_note()
    if note:
        print(note, file=sys.stderr)


def make_runtime(recipe: Recipe, device: str = "auto", compile: bool = False, deterministic: bool = False) -> Runtime:
    """The device, the resolved precision (auto: bf16 on CUDA, else float32; a CPU run
    in bf16 was planned so by :func:`plan_run`); on a busy CPU, a line on its threads."""
    dev = torch.device(_pick_device() if device == "auto" else device)
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if dev.type == "cpu":
        _say_threads()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        tf32 = tf32_switches(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32["matmul"]
        torch.backends.cudnn.allow_tf32 = tf32["cudnn"]
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Runtime(dev, precision, compile, deterministic)


def tf32_switches(precision: str) -> dict:
    """TF32 on CUDA. fp32 keeps PyTorch's defaults, as the report ran: TF32 for cuDNN
    convolutions, not for matmuls. A bf16 run trades that precision for speed anyway."""
    return {"matmul": precision != "fp32", "cudnn": True}


def _pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# --- optimisation ----------------------------------------------------------


def make_optimizer(recipe: Recipe, params):
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay
    )


def make_scheduler(recipe: Recipe, optimizer, steps_per_epoch: int):
    """Stepped once per optimiser step."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=total, pct_start=recipe.warmup
        )
    if recipe.schedule == "multistep":
        # Milestones are epochs; stepped per optimiser step, the lr changes at the first
        # step of the epoch after each milestone, as MultiStepLR stepped per epoch.
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in recipe.milestones], gamma=recipe.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# --- the loop --------------------------------------------------------------


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    best_test_acc: float
    best_state: dict  # the selected checkpoint's weights, on the CPU
    history: list = field(default_factory=list)  # per-epoch metric dicts


def fit(
    model: nn.Module,
    objectives: list,
    data,
    recipe: Recipe,
    rt: Runtime,
    sinks: list | None = None,
    checkpoints=None,
    log=sys.stderr,
    on_step=None,
) -> list[FitResult]:
    """Train the networks of ``model`` for ``recipe.epochs``; keep, for each, the
    checkpoint with the best validation accuracy (never chosen on test data).

    ``model`` holds K >= 1 networks: a :class:`kd_mlflow.models.Classifier` (one: logits
    (B, classes)) or a :class:`kd_mlflow.pack.PackedResNet` (K: logits (K, B, classes)).
    Network i is trained with ``objectives[i](logits, batch)`` and ``sinks[i](epoch,
    metrics)`` receives its metrics, one dict per epoch (``epoch_seconds`` is the whole
    model's). ``checkpoints`` (a :class:`kd_mlflow.checkpoint.CheckpointStore`) makes
    the training resumable, bit for bit. ``on_step(losses)``, if given, receives every
    step's (K,) losses, detached (else see :func:`_step_losses_file`).

    Returns one :class:`FitResult` per network; ``model`` leaves with its last epoch's
    weights.
    """
    sinks = sinks or [None] * len(objectives)
    if len(sinks) != len(objectives):
        raise ValueError(f"{len(objectives)} objectives need {len(objectives)} sinks, not {len(sinks)}")
    steps_per_epoch = -(-data.n_train // recipe.batch_size)
    optimizer = make_optimizer(recipe, model.parameters())
    scheduler = make_scheduler(recipe, optimizer, steps_per_epoch)
    order = torch.Generator().manual_seed(recipe.order_seed)
    done, networks = 0, [_unselected() for _ in objectives]  # epochs done; each network's selection
    saved = checkpoints.load_latest() if checkpoints else None
    if saved is not None:
        done, networks = _restore(saved, model, optimizer, scheduler, order, rt)
        print(f"resuming after epoch {done}", file=log)
    step = torch.compile(model) if rt.compile else model
    on_step = on_step or _step_losses_file()

    for epoch in range(done + 1, recipe.epochs + 1):
        t0 = time.perf_counter()
        scores = _train_epoch(step, objectives, data, recipe, rt, optimizer, scheduler, order, on_step, log, epoch)
        scores.update(_evaluate_networks(step, data, recipe, rt, test=recipe.test_each_epoch))
        seconds = time.perf_counter() - t0
        metrics = [
            {name: v[i].item() for name, v in scores.items()} | {"epoch_seconds": seconds}
            for i in range(len(objectives))
        ]
        _record_epoch(model, networks, metrics, epoch)
        for sink, m in zip(sinks, metrics, strict=True):
            if sink:
                sink(epoch, m)
        if checkpoints:
            checkpoints.save(_snapshot(model, optimizer, scheduler, order, epoch, networks, rt))
        print(_progress_line(epoch, recipe.epochs, metrics), file=log, flush=True)

    if not recipe.test_each_epoch:
        _test_selected(model, networks, data, recipe, rt)
    return [FitResult(**n) for n in networks]


def _unselected() -> dict:
    """A network's selection before its first epoch (the fields of :class:`FitResult`)."""
    return {"best_epoch": 0, "best_val_acc": -1.0, "best_test_acc": math.nan, "best_state": None, "history": []}


def _train_epoch(
    model, objectives, data, recipe, rt, optimizer, scheduler, order, on_step=None, log=None, epoch: int = 0
) -> dict:
    """One epoch: each network's mean training loss and accuracy in percent, (K,) on the CPU."""
    model.train()
    loss_sum = torch.zeros(len(objectives), device=rt.device)
    correct = torch.zeros(len(objectives), device=rt.device, dtype=torch.long)
    batches = data.train_batches(recipe, order)
    for batch in _progress_bar(batches, -(-data.n_train // recipe.batch_size), log, epoch, recipe.epochs):
        with rt.autocast():
            logits = _per_network(model(batch.x), len(batch.y))
        losses = torch.stack([objective(z, batch) for objective, z in zip(objectives, logits, strict=True)])
        optimizer.zero_grad(set_to_none=True)
        # The sum of the networks' mean losses: each network's gradient is its lone
        # gradient (kd_mlflow.pack says why); for one network, its loss.
        losses.sum().backward()
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(losses.detach())
        # Accumulate on the device: no host sync inside the step.
        loss_sum += losses.detach() * len(batch.y)
        correct += (logits.detach().argmax(-1) == batch.y).sum(-1)
    sums = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).double().cpu()  # one host sync per epoch
    return {"train_loss": sums[0] / data.n_train, "train_acc": 100.0 * sums[1] / data.n_train}


def _per_network(logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(K, B, classes): one network's (B, classes) logits are (1, B, classes)."""
    return logits.reshape(-1, batch_size, logits.shape[-1])


def _record_epoch(model, networks: list[dict], metrics: list[dict], epoch: int) -> None:
    """Each network keeps its epoch's metrics, and the weights of its first epoch of
    strictly highest validation accuracy (its selection)."""
    improved = [i for i, m in enumerate(metrics) if m["val_acc"] > networks[i]["best_val_acc"]]
    states = model.network_states() if improved else []
    for i in improved:
        networks[i].update(
            best_val_acc=metrics[i]["val_acc"],
            best_test_acc=metrics[i].get("test_acc", math.nan),
            best_epoch=epoch,
            best_state=states[i],
        )
    for network, m in zip(networks, metrics, strict=True):
        network["history"].append(m)


def _test_selected(model, networks: list[dict], data, recipe: Recipe, rt: Runtime) -> None:
    """``test_each_epoch`` false: one test pass, on each network's selected weights; the
    model then gets its last epoch's weights back."""
    final = cpu_copy(model.state_dict())
    model.load_network_states([n["best_state"] for n in networks])
    tests = evaluate_stacked(model, data, "test", recipe, rt)[1]
    model.load_state_dict(final)
    for network, acc in zip(networks, tests.tolist(), strict=True):
        network["best_test_acc"] = acc


def _step_losses_file():
    """A diagnostic, off by default: with ``KD_MLFLOW_STEP_LOSSES=path`` every optimiser
    step appends one line to ``path``, its K networks' losses (``repr`` floats). It is
    how tests/test_parity.py reads the trajectory of a run made in another process; it
    costs a host sync per step, so only when asked."""
    path = os.environ.get("KD_MLFLOW_STEP_LOSSES")
    if not path:
        return None

    def append(losses: torch.Tensor) -> None:
        with open(path, "a") as f:
            f.write(" ".join(map(repr, losses.tolist())) + "\n")

    return append


def _progress_bar(batches, total: int, log, epoch: int, epochs: int):
    """A bar inside an epoch for a person at a terminal, once the epoch has run for a few
    seconds; nothing when stderr is a file or a pipe (logs stay clean)."""
    if log is None or not getattr(log, "isatty", lambda: False)():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch}/{epochs}", unit="step", delay=3, leave=False, file=log)


@torch.no_grad()
def evaluate_stacked(model, data, which: str, recipe: Recipe, rt: Runtime):
    """(mean cross-entropy, accuracy in percent) on ``which`` ("val" or "test") of each of
    the model's K networks: (K,) CPU tensors."""
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    n = 0
    for batch in data.eval_batches(which, recipe.eval_batch_size):
        with rt.autocast():
            logits = _per_network(model(batch.x), len(batch.y)).float()
        y = batch.y.expand(logits.shape[:-1])
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(logits.movedim(-1, 1), y, reduction="none").sum(-1)
        correct = correct + (logits.argmax(-1) == y).sum(-1)
        n += len(batch.y)
    sums = torch.stack([loss_sum, correct]).double().cpu()  # one host sync per evaluation
    return sums[0] / n, 100.0 * sums[1] / n


@torch.no_grad()
def predict(model, data, which: str, recipe: Recipe, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities, predicted classes) on ``which`` ("val" or "test"), in the
    data's order, on the CPU. The classes are the argmax of the float32 logits, as
    :func:`evaluate_stacked` counts them: the stored probabilities' float16 copy may tie."""
    model.eval()
    probs, classes = [], []
    for batch in data.eval_batches(which, recipe.eval_batch_size):
        with rt.autocast():
            logits = model(batch.x).float()
            probs.append(logits.softmax(1).cpu())
            classes.append(logits.argmax(1).cpu())
    return torch.cat(probs), torch.cat(classes)


def _evaluate_networks(model, data, recipe, rt, test: bool) -> dict:
    """Each network's validation loss and accuracy, and (``test``) test accuracy: (K,) each."""
    val_loss, val_acc = evaluate_stacked(model, data, "val", recipe, rt)
    out = {"val_loss": val_loss, "val_acc": val_acc}
    if test:
        out["test_acc"] = evaluate_stacked(model, data, "test", recipe, rt)[1]
    return out


def evaluate_all(model, data, recipe, rt, test: bool = True) -> dict:
    """One network's validation loss and accuracy, and (``test``) test accuracy."""
    return {name: v.item() for name, v in _evaluate_networks(model, data, recipe, rt, test).items()}


def _progress_line(epoch: int, epochs: int, metrics: list[dict]) -> str:
    """One line per epoch; a figure per network where there are K."""

    def column(name: str, fmt: str) -> str:
        return f"  {name} " + " ".join(format(m[name], fmt) for m in metrics)

    shown = [("train_loss", ".4f"), ("train_acc", ".2f"), ("val_acc", ".2f"), ("test_acc", ".2f")]
    columns = "".join(column(name, fmt) for name, fmt in shown if name in metrics[0])
    return f"epoch {epoch}/{epochs}{columns}  {metrics[0]['epoch_seconds']:.1f}s"


# --- resumable state -------------------------------------------------------


def _snapshot(model, optimizer, scheduler, order, epoch: int, networks: list[dict], rt: Runtime) -> dict:
    """Everything needed to continue bit for bit: weights, optimiser and schedule, every
    random generator, the epoch, and each network's selection and metrics so far."""
    snap = {
        "model": cpu_copy(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "order_rng": order.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "networks": networks,
    }
    if rt.device.type == "cuda":
        snap["cuda_rng"] = torch.cuda.get_rng_state_all()
    return snap


def _restore(snap, model, optimizer, scheduler, order, rt: Runtime) -> tuple[int, list[dict]]:
    """Put a snapshot's state back; returns its epoch and each network's selection."""
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(snap["optimizer"])
    scheduler.load_state_dict(snap["scheduler"])
    order.set_state(snap["order_rng"])
    torch.set_rng_state(snap["torch_rng"])
    if "cuda_rng" in snap and rt.device.type == "cuda":
        torch.cuda.set_rng_state_all(snap["cuda_rng"])
    return snap["epoch"], snap["networks"]
