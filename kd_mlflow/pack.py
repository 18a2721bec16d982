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

This module only makes K networks one module; :func:`kd_mlflow.train.fit` trains it
as it trains one network (a packed wave checkpoints and resumes as one: the packed
weights, the one optimiser and schedule, the order generator, and each network's
best-validation state and history).

:class:`JointModel` is the other use of K networks side by side: not K models, but one
whose output is the mean of their logits, trained as one (Allen-Zhu and Li's "training
the average directly").
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import JOINT_GRADS
from .models import Classifier, cpu_copy

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
    logits (K, B, classes). Preprocessing is the lone :class:`Classifier`'s (all of it:
    size, resize, normalisation), done once for all K. Build it with :func:`pack`."""

    def __init__(self, lone: Classifier, k: int):
        with torch.random.fork_rng(devices=[]):  # the new layers' throwaway init draws
            net = _widen(copy.deepcopy(lone.net), k)  # must not move the caller's seed
        super().__init__(net, **lone.preprocessing())
        self.k = k

    def network_states(self) -> list[dict]:
        return unpack(self)

    def load_network_states(self, states: list[dict]) -> None:
        """Each network's lone state dict, as :func:`pack` places them."""
        self.load_state_dict(_merge(states))


def _widen(net: nn.Module, k: int) -> nn.Module:
    """``net`` (a torchvision ResNet) with every layer replaced by K side by side. The
    block structure and forward code stay torchvision's: they never look at widths."""
    for name, m in list(net.named_modules()):
        new: nn.Module
        if isinstance(m, nn.Conv2d):
            stem = m.in_channels == 3 and m.groups == 1 and name == "conv1"
            new = nn.Conv2d(
                m.in_channels if stem else k * m.in_channels,
                k * m.out_channels,
                m.kernel_size,  # type: ignore[arg-type]  # torch stores the 2-tuples it was given
                m.stride,  # type: ignore[arg-type]
                m.padding,  # type: ignore[arg-type]
                m.dilation,  # type: ignore[arg-type]
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
    states = [cpu_copy(m.state_dict()) for m in models]
    shapes = [{k: v.shape for k, v in sd.items()} for sd in states]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("pack needs networks of one architecture")
    if any(m.preprocessing() != models[0].preprocessing() for m in models):
        raise ValueError("pack needs networks of one preprocessing (input size, resize, normalisation)")
    dtype = next(models[0].parameters()).dtype
    packed = PackedResNet(copy.deepcopy(models[0]).cpu(), len(models)).to(dtype)
    packed.load_network_states(states)
    return packed


def _merge(states: list[dict]) -> dict:
    """K lone state dicts as one packed state dict."""
    merged = {}
    for key, value in states[0].items():
        parts = [sd[key] for sd in states]
        if key in _SHARED or value.dim() == 0:  # preprocessing; BN's num_batches_tracked
            merged[key] = value
        elif _stacks(key):
            merged[key] = torch.stack(parts)
        else:
            merged[key] = torch.cat(parts)
    return merged


def unpack(packed: PackedResNet) -> list[dict]:
    """Each network's state dict in the lone :class:`Classifier`'s format, on the CPU:
    it loads into ``models.build(recipe, classes)`` and gives the same logits."""
    sd = cpu_copy(packed.state_dict())
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


class JointModel(nn.Module):
    """One model made of K networks: its logits are the mean of theirs, (B, classes).

    Allen-Zhu and Li (ICLR 2023, Figure 1) train it with the cross-entropy of that mean,
    ``CE(mean_k z_k, y)``: the gradient reaches every member through the mean, so the
    members learn together, unlike an ensemble's, which learn alone. To the training
    loop it is one network (:meth:`network_states` holds one state); ``members`` is the
    :class:`PackedResNet` of the K, whose (K, B, classes) logits give each member's own
    accuracy.

    ``grad`` (the recipe's ``joint_grad``) sets the scale of each member's gradient. Through
    the mean, member k's logits receive dL/dz_k = (1/K) dL/dz̄: ``mean`` (the default) keeps
    that, 1/K of what a lone network with logits z̄ would receive. ``lone`` multiplies the
    gradient reaching each member's logits by K (a hook; the logits and the logged loss
    are unchanged), so each member is updated as a lone network would be. Why it matters:
    Adam divides each step by the gradient's running scale, so a constant 1/K changes
    (nearly: up to its eps) nothing; SGD's step is lr times the gradient, so ``mean``
    trains each member at lr/K while coupled weight decay (lr * wd * w) keeps its full
    size, K times stronger against the data term (wrn-paper: SGD, wd 5e-4, K = 10).
    ``lone`` is the SGD recipe's lone-network dynamics; scaling the loss by K would do the
    same to the gradient but log a loss K times too large."""

    def __init__(self, members: PackedResNet, grad: str = "mean"):
        super().__init__()
        if grad not in JOINT_GRADS:
            raise ValueError(f"grad must be one of {JOINT_GRADS}, got {grad!r}")
        self.members, self.grad = members, grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.members(x)  # (K, B, classes)
        if self.grad == "lone" and z.requires_grad:
            k = len(z)
            z.register_hook(lambda g: g * k)
        return z.mean(0)

    def network_states(self) -> list[dict]:
        return [cpu_copy(self.state_dict())]

    def load_network_states(self, states: list[dict]) -> None:
        (state,) = states
        self.load_state_dict(state)


def joint(models: list[Classifier], grad: str = "mean") -> JointModel:
    """The K networks as one :class:`JointModel`, each member starting from exactly its
    lone weights (:func:`pack`), with the gradient scale ``grad``. On the CPU."""
    return JointModel(pack(models), grad)
