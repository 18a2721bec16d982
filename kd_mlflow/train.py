"""The one training loop. It takes a model, an objective, data, a recipe, a runtime and a
metrics sink; train, KD and SD all run through :func:`fit`."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Recipe

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
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            for m in model.modules():
                if hasattr(m, "channels_last"):  # models.Classifier: inputs channels-last too
                    m.channels_last = True
        return model


def make_runtime(recipe: Recipe, device: str = "auto", compile: bool = False, deterministic: bool = False) -> Runtime:
    dev = torch.device(_pick_device() if device == "auto" else device)
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
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
    objective,
    data,
    recipe: Recipe,
    rt: Runtime,
    sink=None,
    checkpoints=None,
    log=sys.stderr,
    on_step=None,
) -> FitResult:
    """Train ``model`` with ``objective`` for ``recipe.epochs`` and keep the checkpoint
    with the best validation accuracy (never chosen on test data).

    ``sink(epoch, metrics)`` receives one dict per epoch; ``checkpoints`` (a
    :class:`kd_mlflow.checkpoint.CheckpointStore`) makes the run resumable;
    ``on_step(loss)``, if given, receives every step's loss tensor (detached).
    """
    steps_per_epoch = -(-data.n_train // recipe.batch_size)
    optimizer = make_optimizer(recipe, model.parameters())
    scheduler = make_scheduler(recipe, optimizer, steps_per_epoch)
    order = torch.Generator().manual_seed(recipe.order_seed)
    state = {
        "epoch": 0,
        "best_val_acc": -1.0,
        "best_test_acc": float("nan"),
        "best_epoch": 0,
        "best_state": None,
        "history": [],
    }
    saved = checkpoints.load_latest() if checkpoints else None
    if saved is not None:
        _restore(saved, model, optimizer, scheduler, order, state, rt)
        print(f"resuming after epoch {state['epoch']}", file=log)
    step = torch.compile(model) if rt.compile else model

    for epoch in range(state["epoch"] + 1, recipe.epochs + 1):
        t0 = time.perf_counter()
        metrics = _train_epoch(step, objective, data, recipe, rt, optimizer, scheduler, order, on_step, log, epoch)
        metrics.update(evaluate_all(step, data, recipe, rt, test=recipe.test_each_epoch))
        metrics["epoch_seconds"] = time.perf_counter() - t0
        if metrics["val_acc"] > state["best_val_acc"]:
            state.update(
                best_val_acc=metrics["val_acc"],
                best_test_acc=metrics.get("test_acc", float("nan")),
                best_epoch=epoch,
                best_state=_cpu_copy(model.state_dict()),
            )
        state["epoch"] = epoch
        state["history"].append(metrics)
        if sink:
            sink(epoch, metrics)
        if checkpoints:
            checkpoints.save(_snapshot(model, optimizer, scheduler, order, state, rt))
        print(_progress_line(epoch, recipe.epochs, metrics), file=log, flush=True)

    if not recipe.test_each_epoch and state["best_state"] is not None:
        final = _cpu_copy(model.state_dict())
        model.load_state_dict(state["best_state"])
        state["best_test_acc"] = evaluate(model, data, "test", recipe, rt)[1]
        model.load_state_dict(final)  # the model leaves with its last epoch's weights, as always
    return FitResult(
        state["best_epoch"], state["best_val_acc"], state["best_test_acc"], state["best_state"], state["history"]
    )


def _train_epoch(
    model, objective, data, recipe, rt, optimizer, scheduler, order, on_step=None, log=None, epoch: int = 0
) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    batches = data.train_batches(recipe.batch_size, order, recipe.augment, recipe.order_style, recipe.crop_padding)
    for batch in _progress_bar(batches, -(-data.n_train // recipe.batch_size), log, epoch, recipe.epochs):
        with rt.autocast():
            logits = model(batch.x)
        loss = objective(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(loss.detach())
        # Accumulate on the device: no host sync inside the step.
        loss_sum += loss.detach() * len(batch.y)
        correct += (logits.detach().argmax(1) == batch.y).sum()
    loss_total, n_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return {"train_loss": loss_total / data.n_train, "train_acc": 100.0 * n_correct / data.n_train}


def _progress_bar(batches, total: int, log, epoch: int, epochs: int):
    """A bar inside an epoch for a person at a terminal, once the epoch has run for a few
    seconds; nothing when stderr is a file or a pipe (logs stay clean)."""
    if log is None or not getattr(log, "isatty", lambda: False)():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch}/{epochs}", unit="step", delay=3, leave=False, file=log)


@torch.no_grad()
def evaluate(model, data, which: str, recipe: Recipe, rt: Runtime) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) on ``which`` ("val" or "test")."""
    loss, acc = evaluate_stacked(model, data, which, recipe, rt)
    return loss.item(), acc.item()


@torch.no_grad()
def evaluate_stacked(model, data, which: str, recipe: Recipe, rt: Runtime):
    """:func:`evaluate` as CPU tensors: scalars for a model's (B, classes) logits, or (K,)
    per network for the (K, B, classes) logits of K packed networks (kd_mlflow.pack)."""
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    n = 0
    for batch in data.eval_batches(which, recipe.eval_batch_size):
        with rt.autocast():
            logits = model(batch.x).float()
        y = batch.y.expand(logits.shape[:-1])
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(logits.movedim(-1, 1), y, reduction="none").sum(-1)
        correct = correct + (logits.argmax(-1) == y).sum(-1)
        n += len(batch.y)
    sums = torch.stack([loss_sum, correct]).double().cpu()  # one host sync per evaluation
    return sums[0] / n, 100.0 * sums[1] / n


@torch.no_grad()
def predict(model, data, which: str, recipe: Recipe, rt: Runtime) -> torch.Tensor:
    """Softmax probabilities on ``which`` ("val" or "test"), in the data's order, on the CPU."""
    model.eval()
    out = []
    for batch in data.eval_batches(which, recipe.eval_batch_size):
        with rt.autocast():
            out.append(model(batch.x).float().softmax(1).cpu())
    return torch.cat(out)


def evaluate_all(model, data, recipe, rt, test: bool = True) -> dict:
    """Validation loss and accuracy, and (``test``) test accuracy."""
    val_loss, val_acc = evaluate(model, data, "val", recipe, rt)
    out = {"val_loss": val_loss, "val_acc": val_acc}
    if test:
        out["test_acc"] = evaluate(model, data, "test", recipe, rt)[1]
    return out


def _progress_line(epoch, epochs, m) -> str:
    test = f"  test_acc {m['test_acc']:.2f}" if "test_acc" in m else ""
    return (
        f"epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.2f}"
        f"  val_acc {m['val_acc']:.2f}{test}  {m['epoch_seconds']:.1f}s"
    )


# --- resumable state -------------------------------------------------------


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _snapshot(model, optimizer, scheduler, order, state, rt: Runtime) -> dict:
    """Everything needed to continue bit for bit: weights, optimiser and schedule, every
    random generator, the epoch, the best-validation state and the metrics so far."""
    snap = {
        "model": _cpu_copy(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "order_rng": order.get_state(),
        "torch_rng": torch.get_rng_state(),
        **state,
    }
    if rt.device.type == "cuda":
        snap["cuda_rng"] = torch.cuda.get_rng_state_all()
    return snap


def _restore(snap, model, optimizer, scheduler, order, state, rt: Runtime):
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(snap["optimizer"])
    scheduler.load_state_dict(snap["scheduler"])
    order.set_state(snap["order_rng"])
    torch.set_rng_state(snap["torch_rng"])
    if "cuda_rng" in snap and rt.device.type == "cuda":
        torch.cuda.set_rng_state_all(snap["cuda_rng"])
    for key in state:
        state[key] = snap[key]
