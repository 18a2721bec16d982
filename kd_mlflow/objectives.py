"""Training objectives. The loop calls ``objective(logits, batch)`` and never knows
which one it holds: KD and SD are the same :class:`Distillation` with different
teachers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TEACHER_TARGETS


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network":

        T^2 * KL(softmax(t / T) || softmax(s / T)),

    summed over classes and averaged over the batch ("batchmean": the mean over
    elements would divide the KD term by the number of classes). The T^2 keeps the
    soft term's gradient scale independent of T. At T = 1 this equals the
    cross-entropy to the teacher's probabilities minus the teacher's entropy, which
    does not depend on the student: the report's soft-target loss, same gradients.
    An ensemble teacher's ``teacher_logits`` are those of :func:`ensemble_target`.
    """
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t


def soft_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """The report's distillation loss: cross-entropy to the teacher's probabilities,
    with the student's probabilities clamped to [1e-9, 1 - 1e-9] before the log,

        -mean_b sum_c softmax(t / T)_c * log(clamp(softmax(s / T)_c)),

    times T^2 as in :func:`kd_loss` (the report used T = 1). The clamp is not a
    detail: a class whose student probability is below 1e-9 passes no gradient, where
    :func:`kd_loss` would still pull it towards the teacher. For an ensemble teacher
    the target is the one :func:`ensemble_target` chose (at T = 1 and by default: the
    members' mean softmax).
    """
    t = temperature
    target = F.softmax(teacher_logits.float() / t, dim=1)
    probs = F.softmax(student_logits.float() / t, dim=1).clamp(1e-9, 1 - 1e-9)
    return -(target * probs.log()).sum(1).mean() * t * t


SOFT_LOSSES = {"soft-ce": soft_ce_loss, "kl": kd_loss}


# --- an ensemble teacher's target at T ----------------------------------------------


def ensemble_target(member_logits: torch.Tensor, temperature: float, how: str, combine: str = "prob"):
    """Logits L of an ensemble teacher whose softmax(L / T) is the soft target ``how``
    names, from the members' logits z_k, (K, B, C) -> (B, C); p̄ = (1/K) sum_k softmax(z_k):

    - ``output`` (the default, and all that existed before): the ensemble's own output,
      softened. L = log p̄ for a ``prob`` ensemble, so the target is
      softmax(log p̄ / T) ∝ p̄^(1/T), the averaged probabilities raised to 1/T; L is
      (1/K) sum_k z_k for a ``logit`` ensemble.
    - ``softened-members``: the arithmetic mean of the members' softened distributions,
      (1/K) sum_k softmax(z_k / T), Hinton, Vinyals and Dean (2015), "Distilling the
      Knowledge in a Neural Network" (soft targets of an ensemble: the mean of its
      models' predictive distributions, at the distillation temperature).
      L = T * log((1/K) sum_k softmax(z_k / T)), computed as a logsumexp.
    - ``mean-logit``: the mean logit softened, softmax((1/K) sum_k z_k / T), which is the
      normalised geometric mean of the members' softened distributions,
      ∝ prod_k softmax(z_k / T)^(1/K) (the geometric mean Hinton et al. name beside the
      arithmetic one). L = (1/K) sum_k z_k.

    At T = 1, ``output`` of a ``prob`` ensemble and ``softened-members`` are both p̄;
    ``mean-logit`` is not. ``output`` of a ``logit`` ensemble is ``mean-logit`` at every T.
    """
    z = member_logits.float()
    if how == "output":
        if combine == "logit":
            return z.mean(0)
        return torch.logsumexp(z.log_softmax(-1), dim=0) - math.log(len(z))
    if how == "softened-members":
        t = temperature
        return t * (torch.logsumexp((z / t).log_softmax(-1), dim=0) - math.log(len(z)))
    if how == "mean-logit":
        return z.mean(0)
    raise ValueError(f"teacher_target must be one of {TEACHER_TARGETS}, got {how!r}")


class EnsembleTarget(nn.Module):
    """An ensemble teacher whose logits are :func:`ensemble_target`'s at ``temperature``:
    the objectives soften them as any teacher's, softmax(L / T)."""

    def __init__(self, ensemble, temperature: float, how: str):
        super().__init__()
        self.ensemble, self.temperature, self.how = ensemble, temperature, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_target(self.ensemble.member_logits(x), self.temperature, self.how, self.ensemble.combine)


def teacher_for(model: nn.Module, temperature: float, how: str) -> nn.Module:
    """The teacher model whose logits the objective softens: ``model`` itself for
    ``output`` (so today's teachers are unchanged), else an :class:`EnsembleTarget`."""
    return model if how == "output" else EnsembleTarget(model, temperature, how)


class CrossEntropy:
    def __call__(self, logits, batch):
        return F.cross_entropy(logits.float(), batch.y)


class CachedTeacher:
    """Teacher logits computed once per training image; exact when there is no random
    augmentation, and it removes the teacher's cost from every epoch."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # (n_train, classes), on the device, in training-set order

    def __call__(self, batch):
        return self.logits[batch.idx]


class OnlineTeacher:
    """Teacher run on the very batch the student sees (needed under augmentation)."""

    def __init__(self, model: nn.Module, autocast):
        self.model, self.autocast = model.eval(), autocast

    @torch.no_grad()
    def __call__(self, batch):
        with self.autocast():
            return self.model(batch.x).float()


class Distillation:
    """alpha * soft(student, teacher; T) + (1 - alpha) * CE(labels), where soft is
    :func:`kd_loss` (T^2 KL, the default) or the report's :func:`soft_ce_loss`."""

    def __init__(self, teacher, temperature: float, alpha: float, loss: str = "kl"):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.soft_loss = SOFT_LOSSES[loss]

    def __call__(self, logits, batch):
        soft = self.soft_loss(logits, self.teacher(batch), self.temperature)
        if self.alpha == 1.0:
            return soft
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(logits.float(), batch.y)


def objective_for(recipe, teacher=None):
    """The recipe's training objective: with a ``teacher``, its distillation (temperature,
    alpha and soft loss); else cross-entropy. The one place that maps a recipe to an
    objective: a new one is a class above and its case here, never a change to the steps."""
    if teacher is None:
        return CrossEntropy()
    return Distillation(teacher, recipe.temperature, recipe.alpha, recipe.distill_loss)


@torch.no_grad()
def teacher_table(model: nn.Module, data, autocast, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` for every training image, in training-set order."""
    model.eval()
    out = []
    for start in range(0, data.n_train, batch_size):
        with autocast():
            out.append(model(data.train_x[start : start + batch_size]).float())
    return torch.cat(out)
