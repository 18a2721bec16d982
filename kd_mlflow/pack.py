"""K ResNet-18s trained side by side as one wider network.

The networks of a wave (five seeds, or five SD students) see the same batches in the
same order: the batch order and the crop/flip draws come from ``recipe.order_seed``,
never from the model seed (:meth:`kd_mlflow.data.DeviceData.train_batches`). So K of
them can run as one network whose every layer holds the K networks' layers side by
side, and one small GPU-starving ResNet-18 becomes a K times wider one:

- a convolution becomes a grouped convolution (``groups=K``): group k sees only
  network k's channels and holds exactly network k's kernel;
- batch norm over K*C channels *is* per-network batch norm (statistics are per channel);
- the classifier is a batched matmul, (K, B, features) x (K, features, classes);
- the stem is a dense convolution 3 -> K*width whose output channels are the K stems
  stacked. Repeating the input K times with ``groups=K`` would give the same numbers,
  but reads and stores the input K times and runs K tiny 3-channel convolutions
  instead of one GEMM with K times the output channels.

Training is exact, not approximate: logits of network k depend only on network k's
weights, the loss is the *sum* over networks of each network's mean loss (so each
network's gradient is its lone gradient), and Adam and SGD (momentum, nesterov, L2
weight decay) update every element independently, so one optimiser over the packed
tensors is K lone optimisers. Anything that couples elements across networks would
break this (gradient norm clipping, LARS/LAMB trust ratios, a shared loss scale);
the recipes have none. The numbers agree up to float rounding of the different
convolution kernels (tests/test_pack.py).

A packed wave checkpoints and resumes as one: the packed weights, the one optimiser and
schedule, the order generator, and each network's best-validation state and history.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from torch import nn

from .models import Classifier
from .train import FitResult, Runtime, _cpu_copy, _restore, _snapshot, evaluate_stacked, make_optimizer, make_scheduler

# Classifier entries that are the same for every network (preprocessing constants).
_SHARED = ("mean", "std")


class PackedLinear(nn.Module):
    """K linear layers as one batched matmul: (B, K * features) -> (K, B, classes)."""

    def __init__(self, k: int, in_features: int, out_features: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.k, -1).transpose(0, 1)  # (K, B, features)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class PackedResNet(Classifier):
    """K networks of one architecture as one module: uint8 images (B, 3, H, W) ->
    logits (K, B, classes). Preprocessing is the lone :class:`Classifier`'s, done once
    for all K. Build it with :func:`pack`."""

    def __init__(self, lone: Classifier, k: int):
        with torch.random.fork_rng(devices=[]):  # the new layers' throwaway init draws
            net = _widen(copy.deepcopy(lone.net), k)  # must not move the caller's seed
        super().__init__(net, lone.image_size, lone.mean.flatten().tolist(), lone.std.flatten().tolist())
        self.k = k


def _widen(net: nn.Module, k: int) -> nn.Module:
    """``net`` (a torchvision ResNet) with every layer replaced by K side by side. The
    block structure and forward code stay torchvision's: they never look at widths."""
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.Conv2d):
            stem = m.in_channels == 3 and m.groups == 1 and name == "conv1"
            new = nn.Conv2d(
                m.in_channels if stem else k * m.in_channels,
                k * m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                groups=1 if stem else k * m.groups,
                bias=m.bias is not None,
            )
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(k * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, nn.Linear):
            new = PackedLinear(k, m.in_features, m.out_features)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new)
    return net


def _stacks(key: str) -> bool:
    """Whether ``key``'s K lone tensors are stacked on a new first dimension (the
    classifier's weight and bias) rather than concatenated along the first one."""
    return key.startswith("net.fc.")


def pack(models: list[Classifier]) -> PackedResNet:
    """The K lone networks as one :class:`PackedResNet`, each starting from exactly its
    lone weights (and batch-norm statistics). The result is on the CPU."""
    if len(models) < 1:
        raise ValueError("pack needs at least one model")
    states = [_cpu_copy(m.state_dict()) for m in models]
    first = states[0]
    for m, sd in zip(models, states, strict=True):
        shapes = {k: v.shape for k, v in sd.items()}
        if shapes != {k: v.shape for k, v in first.items()} or m.image_size != models[0].image_size:
            raise ValueError("pack needs networks of one architecture and input size")
        for key in _SHARED:
            if not torch.equal(sd[key], first[key]):
                raise ValueError(f"pack needs the same preprocessing; {key} differs")
    dtype = next(models[0].parameters()).dtype
    packed = PackedResNet(copy.deepcopy(models[0]).cpu(), len(models)).to(dtype)
    merged = {}
    for key, value in first.items():
        parts = [sd[key] for sd in states]
        if key in _SHARED or value.dim() == 0:  # preprocessing; BN's num_batches_tracked
            merged[key] = value
        elif _stacks(key):
            merged[key] = torch.stack(parts)
        else:
            merged[key] = torch.cat(parts)
    packed.load_state_dict(merged)
    return packed


def unpack(packed: PackedResNet) -> list[dict]:
    """Each network's state dict in the lone :class:`Classifier`'s format, on the CPU:
    it loads into ``models.build(recipe, classes)`` and gives the same logits."""
    sd = _cpu_copy(packed.state_dict())
    out: list[dict] = [{} for _ in range(packed.k)]
    for key, value in sd.items():
        if key in _SHARED or value.dim() == 0:
            parts = [value.clone() for _ in range(packed.k)]
        elif _stacks(key):
            parts = [v.clone() for v in value.unbind(0)]
        else:
            parts = [v.clone() for v in value.chunk(packed.k, 0)]
        for state, part in zip(out, parts, strict=True):
            state[key] = part
    return out


# --- training --------------------------------------------------------------------


def fit_packed(
    models: list[Classifier], objectives, data, recipe, rt: Runtime, sinks=None, log=sys.stderr, checkpoints=None
) -> list[FitResult]:
    """:func:`kd_mlflow.train.fit` for K networks at once, as one packed network.

    ``objectives``: one objective per network (``objective(logits, batch)``, e.g. a
    :class:`~kd_mlflow.objectives.Distillation` with that network's own teacher table),
    or one objective shared by all. ``sinks``: one ``sink(epoch, metrics)`` per network,
    or None. Each network gets its own history and best-validation checkpoint (the
    first epoch of strictly highest ``val_acc``), as it would alone; ``epoch_seconds``
    is the packed epoch's wall time (all K networks). On return every lone model holds
    its final-epoch weights, as after :func:`~kd_mlflow.train.fit`. ``checkpoints`` (a
    :class:`kd_mlflow.checkpoint.CheckpointStore`) makes the wave resumable, bit for bit
    as a lone run is.
    """
    k = len(models)
    objectives = list(objectives) if isinstance(objectives, (list, tuple)) else [objectives] * k
    sinks = list(sinks) if sinks else [None] * k
    if len(objectives) != k or len(sinks) != k:
        raise ValueError(f"{k} models need {k} objectives and {k} sinks")
    packed = rt.prepare(pack(models))
    steps_per_epoch = -(-data.n_train // recipe.batch_size)
    optimizer = make_optimizer(recipe, packed.parameters())
    scheduler = make_scheduler(recipe, optimizer, steps_per_epoch)
    order = torch.Generator().manual_seed(recipe.order_seed)  # as fit draws it
    step = torch.compile(packed) if rt.compile else packed
    best = [{"val": -1.0, "test": float("nan"), "epoch": 0, "state": None} for _ in range(k)]
    histories: list[list[dict]] = [[] for _ in range(k)]
    state = {"epoch": 0, "best": best, "histories": histories}
    saved = checkpoints.load_latest() if checkpoints else None
    if saved is not None:
        if len(saved["best"]) != k:
            raise ValueError(f"the wave's checkpoint holds {len(saved['best'])} networks, not {k}")
        _restore(saved, packed, optimizer, scheduler, order, state, rt)  # as a lone run resumes
        best, histories = state["best"], state["histories"]
        print(f"resuming the packed wave after epoch {state['epoch']}", file=log)

    for epoch in range(state["epoch"] + 1, recipe.epochs + 1):
        t0 = time.perf_counter()
        train = train_epoch_packed(step, objectives, data, recipe, rt, optimizer, scheduler, order)
        val_loss, val_acc = evaluate_stacked(step, data, "val", recipe, rt)
        test_acc = evaluate_stacked(step, data, "test", recipe, rt)[1] if recipe.test_each_epoch else None
        seconds = time.perf_counter() - t0
        metrics = [
            {
                "train_loss": train[0][i].item(),
                "train_acc": train[1][i].item(),
                "val_loss": val_loss[i].item(),
                "val_acc": val_acc[i].item(),
                **({"test_acc": test_acc[i].item()} if test_acc is not None else {}),
                "epoch_seconds": seconds,
            }
            for i in range(k)
        ]
        improved = [i for i in range(k) if metrics[i]["val_acc"] > best[i]["val"]]
        states = unpack(packed) if improved else None
        for i in improved:
            best[i].update(
                val=metrics[i]["val_acc"], test=metrics[i].get("test_acc", float("nan")), epoch=epoch, state=states[i]
            )
        for i in range(k):
            histories[i].append(metrics[i])
            if sinks[i]:
                sinks[i](epoch, metrics[i])
        state["epoch"] = epoch
        if checkpoints:
            checkpoints.save(_snapshot(packed, optimizer, scheduler, order, state, rt))
        print(
            f"epoch {epoch}/{recipe.epochs}  {k} packed networks  val_acc "
            + " ".join(f"{m['val_acc']:.2f}" for m in metrics)
            + f"  {seconds:.1f}s",
            file=log,
            flush=True,
        )

    final = unpack(packed)
    if not recipe.test_each_epoch and all(b["state"] is not None for b in best):
        # One test pass, on each network's selected weights, packed again.
        for model, b in zip(models, best, strict=True):
            model.load_state_dict(b["state"])
        tests = evaluate_stacked(rt.prepare(pack(models)), data, "test", recipe, rt)[1]
        for i in range(k):
            best[i]["test"] = tests[i].item()
    for model, state in zip(models, final, strict=True):
        model.load_state_dict(state)
    return [FitResult(b["epoch"], b["val"], b["test"], b["state"], h) for b, h in zip(best, histories, strict=True)]


def train_epoch_packed(model, objectives, data, recipe, rt, optimizer, scheduler, order):
    """One epoch of the packed network; returns (train_loss, train_acc), each (K,) on
    the CPU, with the lone loop's definitions (mean loss, accuracy in percent)."""
    model.train()
    k = len(objectives)
    loss_sum = torch.zeros(k, device=rt.device)
    correct = torch.zeros(k, device=rt.device)
    for batch in data.train_batches(recipe.batch_size, order, recipe.augment):
        with rt.autocast():
            logits = model(batch.x)  # (K, B, classes)
        losses = torch.stack([obj(logits[i], batch) for i, obj in enumerate(objectives)])
        optimizer.zero_grad(set_to_none=True)
        # The sum of the networks' mean losses: network k's gradient is its lone gradient.
        losses.sum().backward()
        optimizer.step()
        scheduler.step()
        loss_sum += losses.detach() * len(batch.y)
        correct += (logits.detach().argmax(-1) == batch.y).sum(-1)
    sums = torch.stack([loss_sum, correct]).double().cpu()  # one host sync
    return sums[0] / data.n_train, 100.0 * sums[1] / data.n_train
