"""ResNet-18 variants built on torchvision, behind one preprocessing wrapper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .config import Recipe


class Classifier(nn.Module):
    """uint8 images (B, 3, H, W) -> logits. Resize and normalisation live here so that
    training, evaluation and the logged MLflow model preprocess identically."""

    mean: torch.Tensor  # buffers, (1, 3, 1, 1)
    std: torch.Tensor

    def __init__(self, net: nn.Module, image_size: int, mean, std, resize: str = "float"):
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.resize = resize
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def preprocessing(self) -> dict:
        """The constructor's preprocessing arguments: another Classifier built with them
        (kd_mlflow.pack's, of K networks) sees exactly the pixels this one sees."""
        mean, std = (t.flatten().tolist() for t in (self.mean, self.std))
        return {"image_size": self.image_size, "mean": mean, "std": std, "resize": self.resize}

    def network_states(self) -> list[dict]:
        """The state dict of each network this module holds, on the CPU, in a lone
        Classifier's format: one here, K in a :class:`kd_mlflow.pack.PackedResNet`."""
        return [cpu_copy(self.state_dict())]

    def load_network_states(self, states: list[dict]) -> None:
        """Load what :meth:`network_states` gave."""
        (state,) = states
        self.load_state_dict(state)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the network's normalised float input."""
        size = (self.image_size, self.image_size)
        # As torchvision's ToTensor then Normalize: divide by 255, subtract, divide.
        if tuple(x.shape[-2:]) == size:
            x = x.float() / 255.0
        elif self.resize == "pil":
            x = _resize_pil(x.float(), size) / 255.0
        else:
            x = _resize_float(x.float() / 255.0, size)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self.channels_last:  # decided once, by the runtime (train.Runtime.prepare)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def cpu_copy(state_dict: dict) -> dict:
    """A state dict's tensors copied to the CPU: a snapshot that training cannot change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _resize_float(x: torch.Tensor, size) -> torch.Tensor:
    # One bilinear pass in float; upscaling needs no antialias.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _resize_pil(x: torch.Tensor, size) -> torch.Tensor:
    """What PIL's ``Image.resize(BILINEAR)`` (torchvision's ``Resize`` on PIL images)
    computes: a horizontal pass, then a vertical one, each stored as uint8. The float
    one-pass result is up to a grey level away; rounding after each pass, in PIL's
    order, gives PIL's pixels (exactly, for 32 -> 224: tests/test_fidelity.py).
    antialias=True is torch's PIL-style filter (it matters only when shrinking)."""
    h, w = size
    x = F.interpolate(x, size=(x.shape[-2], w), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255)


def build(recipe: Recipe, num_classes: int, draws_before: int = 0) -> Classifier:
    """The recipe's network, initialised from torch's global generator (seed it first).

    ``draws_before`` networks are built and thrown away first, so that the returned one
    holds the same draws as the report's SD student, which its script built after a
    throw-away teacher network (see :func:`draws_before_student`).
    """
    for _ in range(draws_before):
        _resnet18(recipe, num_classes)
    net = _resnet18(recipe, num_classes)
    return Classifier(net, recipe.image_size, recipe.mean, recipe.std, recipe.resize)


def draws_before_student(recipe: Recipe, method: str) -> int:
    """Throw-away networks before a distillation student of ``method`` ("kd" or "sd"):
    the report's SD script builds its teacher's network first, its KD script does not."""
    return recipe.student_init_skip if method == "sd" else 0


def _resnet18(recipe: Recipe, num_classes: int) -> ResNet:
    width, cifar_stem = recipe.width, recipe.model == "resnet18-cifar"
    if recipe.init_style == "torchvision-fc":
        # The report's construction: ImageNet's 1000-class network, then a fresh head.
        net = torchvision.models.resnet18()
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    else:
        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if width == 64 and not cifar_stem:
        return net  # exactly torchvision's resnet18, same init draws
    if width != 64:
        # torchvision's BasicBlock has no width knob: rebuild the stages at `width`
        # with torchvision's own _make_layer, then redo its initialisation.
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
        net.fc = nn.Linear(8 * width, num_classes)
    if cifar_stem:
        # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the spatial detail.
        net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net
