"""The public report's input pipeline, rebuilt as the baseline for ``vs_report_pipeline``.

Its structure, kept on purpose: a torchvision-style dataset that turns each stored
uint8 image into a PIL image on every access, per-image transforms Resize -> ToTensor ->
Normalize, a DataLoader that collates on the host, a copy to the device per batch, and
``loss.item()`` every step (a host sync). The report resized 32 -> 224 for torchvision's
resnet18; here the size is the preset's, so a quick run stays small.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PilImages(Dataset):
    """Like torchvision.datasets.CIFAR10: HWC uint8 arrays, made PIL per item."""

    def __init__(self, x_nchw: torch.Tensor, y: torch.Tensor, transform):
        self.images = x_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(np.asarray(self.images[i]))), self.labels[i]


def loader(
    x: torch.Tensor, y: torch.Tensor, image_size: int, mean, std, batch_size: int, workers: int, seed: int = 0
) -> DataLoader:
    tf = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(), transforms.Normalize(mean, std)])
    return DataLoader(
        PilImages(x, y, tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )


def train_epoch(net, batches: DataLoader, optimizer, device, autocast) -> float:
    """One epoch as the report's loop wrote it; returns the mean loss."""
    net.train()
    running = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(y)  # a host sync every step, as in the report
    return running / len(batches.dataset)
