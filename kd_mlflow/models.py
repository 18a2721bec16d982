"""ResNet-18 variants built on torchvision, behind one preprocessing wrapper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .config import Recipe


class Classifier(nn.Module):
    """uint8 images (B, 3, H, W) -> logits. Resize and normalisation live here so that
    training, evaluation and the logged MLflow model preprocess identically."""

    def __init__(self, net: nn.Module, image_size: int, mean, std):
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # The report resized 32 -> 224 bilinearly; upscaling needs no antialias.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        x = (x - self.mean) / self.std
        if self.mean.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def build(recipe: Recipe, num_classes: int) -> Classifier:
    net = _resnet18(num_classes, recipe.width, cifar_stem=recipe.model == "resnet18-cifar")
    return Classifier(net, recipe.image_size, recipe.mean, recipe.std)


def _resnet18(num_classes: int, width: int, cifar_stem: bool) -> ResNet:
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if width == 64 and not cifar_stem:
        return net  # exactly torchvision.models.resnet18(num_classes=...), same init draws
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
