"""An ensemble is a model: evaluated like one, logged like one, used as a teacher."""

from __future__ import annotations

import torch
from torch import nn

from .config import COMBINES
from .objectives import ensemble_target


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

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's float32 logits, (M, B, C): what a teacher target other than the
        ensemble's own output is made from (kd_mlflow.objectives.ensemble_target)."""
        return torch.stack([m(x).float() for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_target(self.member_logits(x), 1.0, "output", self.combine)
