"""The model registry: every network a recipe's ``model`` can name, behind one
preprocessing wrapper.

:data:`REGISTRY` maps a name to an :class:`Entry` (its builder, stem, input size and
whether :mod:`kd_mlflow.pack` can pack it); ``wrn-D-K`` names are built on demand
(:func:`entry`). ``config.MODELS`` holds the same names without torch (a test keeps the
two equal).

``width`` is the network's size in 64ths of its published one, for every family, so
that one recipe's width means the same relative size whatever the model: 64 is the
published network. Per family, the channels it sets:

- torchvision ResNets (``resnet18`` ... ``resnet152``, ``resnetNN-cifar``): the first
  stage has ``width`` channels (64 = torchvision's), the others 2x, 4x, 8x;
- CIFAR ResNets of He et al. (``resnet20`` ...): stages of 16, 32, 64 x width/64;
- Wide ResNets ``wrn-D-K``: a 16 x width/64 stem, stages of 16K, 32K, 64K x width/64;
- MobileNetV2 (``mobilenet_v2``, ``mobilenetv2``): torchvision's ``width_mult`` =
  width/64 (its channels rounded to multiples of 8, the last layer never below 1280).

A scaled channel count is rounded to the nearest integer, at least 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .config import MODELS, WRN_NAME, ConfigError, Recipe, check_model


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


# --- the registry ----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One name of the registry. ``build(width, num_classes, init_style)`` returns the
    bare network (images normalised, at any size its stem takes) -> logits."""

    name: str
    family: str
    stem: str  # "imagenet" (7x7 stride 2, max-pool) | "cifar" (3x3 stride 1)
    input_size: int  # the size it was designed for: 224 or 32 pixels
    build: Callable[[int, int, str], nn.Module]
    packable: bool  # kd_mlflow.pack packs it (tests/test_models.py checks it does)


def _scaled(channels: int, width: int) -> int:
    return max(1, (channels * width + 32) // 64)


def _with_head(make: Callable[[int], nn.Module], head: str, num_classes: int, init_style: str) -> nn.Module:
    """``init_style`` "direct": built at ``num_classes``; "torchvision-fc": built at
    ImageNet's 1,000 classes, then the classifier ``head`` (an attribute path) replaced
    by a fresh one, as the report built its network (its draws come after the net's)."""
    if init_style != "torchvision-fc":
        return make(num_classes)
    net = make(1000)
    parent, _, attr = head.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Linear(old.in_features, num_classes))
    return net


# torchvision's ResNets: (block, blocks per stage)
_RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _torchvision_resnet(arch: str, cifar_stem: bool) -> Callable[[int, int, str], nn.Module]:
    block, layers = _RESNETS[arch]

    def build(width: int, num_classes: int, init_style: str) -> nn.Module:
        # resnet18 and resnet18-cifar are built exactly as before the registry (the same
        # random draws, in the same order), so earlier runs keep their weights.
        if init_style == "torchvision-fc":
            # The report's construction: ImageNet's 1000-class network, then a fresh head.
            net = getattr(torchvision.models, arch)()
            net.fc = nn.Linear(net.fc.in_features, num_classes)
        else:
            net = ResNet(block, layers, num_classes=num_classes)
        if width == 64 and not cifar_stem:
            return net  # exactly torchvision's network, same init draws
        if width != 64:
            # torchvision's blocks have no width knob: rebuild the stages at `width`
            # with torchvision's own _make_layer, then redo its initialisation.
            net.inplanes = width
            net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            net.bn1 = nn.BatchNorm2d(width)
            net.layer1 = net._make_layer(block, width, layers[0])
            net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
            net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
            net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
            net.fc = nn.Linear(8 * width * block.expansion, num_classes)
        if cifar_stem:
            # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the spatial detail.
            net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        return net

    return build


def _init_like_torchvision(net: nn.Module) -> nn.Module:
    """torchvision's ResNet initialisation: He-normal (fan_out) convolutions, batch norm
    1 and 0; linear layers keep torch's default."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


# --- He et al. (2016), section 4.2: the CIFAR ResNets ------------------------------


class _ZeroPadShortcut(nn.Module):
    """Option A: the identity; where a block halves the size and adds channels, the
    input subsampled (stride 2) and padded with zero channels. No parameters: the
    option the paper's CIFAR networks use (and their 0.27M ... 1.7M parameters)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _CifarBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _ZeroPadShortcut(stride, cout - cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s 6n + 2-layer CIFAR ResNet: a 3x3 stem, three stages of n blocks at
    16, 32 and 64 channels (x width/64; stride 2 into stages 2 and 3), global average
    pooling, one linear layer."""

    def __init__(self, depth: int, width: int, num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        c = [_scaled(16, width), _scaled(32, width), _scaled(64, width)]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        stages, cin = [], c[0]
        for i, cout in enumerate(c):
            blocks = [_CifarBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c[2], num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth: int) -> Callable[[int, int, str], nn.Module]:
    def build(width: int, num_classes: int, init_style: str) -> nn.Module:
        return _with_head(lambda k: CifarResNet(depth, width, k), "fc", num_classes, init_style)

    return build


# --- Zagoruyko and Komodakis (2016): Wide ResNets ----------------------------------


class _WideBlock(nn.Module):
    """Pre-activation B(3,3): BN-ReLU-conv3x3-BN-ReLU-conv3x3; where the shape changes,
    a 1x1 convolution of the activated input is the shortcut (as the authors' code)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-D-K: a 3x3 stem of 16 channels, three stages of (D - 4) / 6 blocks at 16K,
    32K and 64K channels (all x width/64; stride 2 into stages 2 and 3), BN-ReLU, global
    average pooling, one linear layer. No dropout."""

    def __init__(self, depth: int, k: int, width: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        stem = _scaled(16, width)
        c = [_scaled(16 * k, width), _scaled(32 * k, width), _scaled(64 * k, width)]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)  # "conv1": kd_mlflow.pack's stem
        stages, cin = [], stem
        for i, cout in enumerate(c):
            blocks = [_WideBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(c[2])
        self.fc = nn.Linear(c[2], num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _wide_resnet(depth: int, k: int) -> Callable[[int, int, str], nn.Module]:
    def build(width: int, num_classes: int, init_style: str) -> nn.Module:
        return _with_head(lambda n: WideResNet(depth, k, width, n), "fc", num_classes, init_style)

    return build


# --- MobileNetV2 ---------------------------------------------------------------------


def _mobilenet_v2(cifar_strides: bool) -> Callable[[int, int, str], nn.Module]:
    def build(width: int, num_classes: int, init_style: str) -> nn.Module:
        def make(k: int) -> nn.Module:
            net = torchvision.models.mobilenet_v2(num_classes=k, width_mult=width / 64)
            if cifar_strides:
                # 32x32 inputs: stride 1 in the stem and in the first 24-channel block
                # (the usual CIFAR MobileNetV2), so the last stage sees 4x4, not 1x1.
                net.features[0][0].stride = (1, 1)
                net.features[2].conv[1][0].stride = (1, 1)
            return net

        return _with_head(make, "classifier.1", num_classes, init_style)

    return build


def _entries() -> dict[str, Entry]:
    out = {}
    for arch in _RESNETS:
        out[arch] = Entry(arch, "torchvision ResNet", "imagenet", 224, _torchvision_resnet(arch, False), True)
    for arch in ("resnet18", "resnet34", "resnet50"):
        name = f"{arch}-cifar"
        out[name] = Entry(name, "torchvision ResNet, CIFAR stem", "cifar", 32, _torchvision_resnet(arch, True), True)
    for depth in (8, 14, 20, 32, 44, 56, 110):
        name = f"resnet{depth}"
        out[name] = Entry(name, "CIFAR ResNet (He et al. 2016), option A", "cifar", 32, _cifar_resnet(depth), False)
    out["mobilenet_v2"] = Entry("mobilenet_v2", "torchvision MobileNetV2", "imagenet", 224, _mobilenet_v2(False), False)
    out["mobilenetv2"] = Entry(
        "mobilenetv2", "torchvision MobileNetV2, CIFAR strides", "cifar", 32, _mobilenet_v2(True), False
    )
    for name in MODELS:
        if WRN_NAME.fullmatch(name):
            out[name] = _wrn_entry(name)
    return {name: out[name] for name in MODELS if name in out}


def _wrn_entry(name: str) -> Entry:
    m = WRN_NAME.fullmatch(name)
    assert m is not None
    depth, k = int(m[1]), int(m[2])
    return Entry(name, "Wide ResNet (Zagoruyko and Komodakis 2016)", "cifar", 32, _wide_resnet(depth, k), True)


REGISTRY: dict[str, Entry] = _entries()


def entry(name: str) -> Entry:
    """The registry's entry for ``name`` (any wrn-D-K too), or a ConfigError."""
    check_model(name)
    return REGISTRY.get(name) or _wrn_entry(name)


def check_packable(model: str, needs: str | None = None) -> None:
    """Packing (kd_mlflow.pack) widens torchvision ResNets and Wide ResNets, layer by
    layer; other networks are refused before any run exists. ``needs``: what packs them
    where it is not --pack (then the refused value is the model)."""
    if not entry(model).packable:
        packable = ", ".join(n for n, e in REGISTRY.items() if e.packable)
        listed = f"{model} cannot be packed (packable: {packable}, any wrn-D-K)"
        if needs:
            raise ConfigError("model", model, f"{needs}: {listed}")
        raise ConfigError("pack", model, f"{listed}; train without --pack")


def build(recipe: Recipe, num_classes: int, draws_before: int = 0) -> Classifier:
    """The recipe's network, initialised from torch's global generator (seed it first).

    ``draws_before`` networks are built and thrown away first, so that the returned one
    holds the same draws as the report's SD student, which its script built after a
    throw-away teacher network (see :func:`draws_before_student`).
    """
    make = entry(recipe.model).build
    for _ in range(draws_before):
        make(recipe.width, num_classes, recipe.init_style)
    net = make(recipe.width, num_classes, recipe.init_style)
    return Classifier(net, recipe.image_size, recipe.mean, recipe.std, recipe.resize)


def draws_before_student(recipe: Recipe, method: str) -> int:
    """Throw-away networks before a distillation student of ``method`` ("kd" or "sd"):
    the report's SD script builds its teacher's network first, its KD script does not."""
    return recipe.student_init_skip if method == "sd" else 0


# --- sizes: what `kd-mlflow models` lists ------------------------------------------


def size(name: str, width: int = 64, num_classes: int = 10) -> dict:
    """The network's parameters and forward FLOPs for one image at its input size,
    counted by torch (torch.utils.flop_counter: a multiply-add is 2 FLOPs) on the meta
    device: nothing is allocated or computed, so WRN-28-10 costs what resnet8 does."""
    from torch.utils.flop_counter import FlopCounterMode

    e = entry(name)
    with torch.device("meta"):
        net = e.build(width, num_classes, "direct").eval()
        x = torch.empty(1, 3, e.input_size, e.input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return {
        "name": name,
        "family": e.family,
        "stem": e.stem,
        "input_size": e.input_size,
        "width": width,
        "classes": num_classes,
        "parameters": sum(p.numel() for p in net.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
        "packable": e.packable,
    }
