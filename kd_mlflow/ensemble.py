"""An ensemble is a model: evaluated like one, logged like one, used as a teacher."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import COMBINES


class Ensemble(nn.Module):
    """Averages its members' softmax probabilities (the report's method) or their logits.

    ``forward`` returns logits in both cases. For ``prob`` they are
    log(mean_i softmax(z_i)), whose softmax is exactly the averaged probabilities, so
    accuracy, cross-entropy and distillation read the ensemble like any network.
    """

    def __init__(self, members: list[nn.Module], combine: str = "prob"):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(x).float() for m in self.members])  # (M, B, C)
        if self.combine == "logit":
            return outs.mean(0)
        return torch.logsumexp(outs.log_softmax(-1), dim=0) - math.log(len(self.members))
