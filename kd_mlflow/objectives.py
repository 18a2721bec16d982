"""Training objectives. The loop calls ``objective(logits, batch)`` and never knows
which one it holds: KD and SD are the same :class:`Distillation` with different
teachers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network":

        T^2 * KL(softmax(t / T) || softmax(s / T)),

    summed over classes and averaged over the batch ("batchmean": the mean over
    elements would divide the KD term by the number of classes). The T^2 keeps the
    soft term's gradient scale independent of T. At T = 1 this equals the
    cross-entropy to the teacher's probabilities minus the teacher's entropy, which
    does not depend on the student: the report's soft-target loss, same gradients.
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
    (log of its mean probabilities) the target is the members' mean softmax.
    """
    t = temperature
    target = F.softmax(teacher_logits.float() / t, dim=1)
    probs = F.softmax(student_logits.float() / t, dim=1).clamp(1e-9, 1 - 1e-9)
    return -(target * probs.log()).sum(1).mean() * t * t


SOFT_LOSSES = {"soft-ce": soft_ce_loss, "kl": kd_loss}


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


def distillation(teacher, recipe) -> Distillation:
    """The recipe's distillation objective (temperature, alpha and soft loss)."""
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
