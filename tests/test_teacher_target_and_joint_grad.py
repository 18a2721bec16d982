"""Two recipe fields of issue 32: an ensemble teacher's target at T (``teacher_target``),
and the joint model's gradient scale per member (``joint_grad``). The references are the
definitions, written out here in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_mlflow import config, models, pack
from kd_mlflow.config import Recipe, effective_target
from kd_mlflow.ensemble import Ensemble
from kd_mlflow.objectives import ensemble_target, teacher_for

# K = 3 members, B = 2 images, C = 4 classes: far enough apart that the targets differ.
Z = torch.tensor(
    [
        [[4.0, 1.0, 0.0, -2.0], [0.5, 0.0, 3.0, 1.0]],
        [[0.0, 5.0, 1.0, 0.0], [2.0, -1.0, 0.0, 0.0]],
        [[1.0, 1.0, 6.0, -3.0], [0.0, 4.0, 0.0, 1.0]],
    ],
    dtype=torch.float64,
)


def _target(how: str, t: float, combine: str = "prob") -> torch.Tensor:
    """The distribution the objective sees: softmax(L / T) of ensemble_target's logits."""
    return (ensemble_target(Z, t, how, combine).double() / t).softmax(-1)


def _definition(how: str, t: float) -> torch.Tensor:
    p_bar = Z.softmax(-1).mean(0)
    if how == "sharpened-mean":  # the averaged probabilities raised to 1/T, normalised
        q = p_bar ** (1 / t)
        return q / q.sum(-1, keepdim=True)
    if how == "mean-of-softened":  # Hinton et al.: the mean of the softened members
        return (Z / t).softmax(-1).mean(0)
    # normalised geometric mean of the softened members
    g = torch.prod((Z / t).softmax(-1) ** (1 / len(Z)), dim=0)
    return g / g.sum(-1, keepdim=True)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_each_target_is_its_definition(t):
    close = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_target("output", t), _definition("sharpened-mean", t), **close)
    torch.testing.assert_close(_target("softened-members", t), _definition("mean-of-softened", t), **close)
    torch.testing.assert_close(_target("mean-logit", t), _definition("geometric", t), **close)
    # a logit ensemble's own output is its mean logit, softened
    torch.testing.assert_close(_target("output", t, "logit"), _definition("geometric", t), **close)


def test_at_t1_the_output_and_the_mean_of_softened_members_agree_and_the_mean_logit_does_not():
    """At T = 1 a prob ensemble's output and the members' mean softmax are both p̄; the
    geometric mean is another distribution."""
    torch.testing.assert_close(_target("output", 1.0), _target("softened-members", 1.0), atol=1e-6, rtol=1e-5)
    assert (_target("mean-logit", 1.0) - _target("output", 1.0)).abs().max() > 0.05


def test_at_t4_the_three_targets_differ():
    targets = [_target(h, 4.0) for h in config.TEACHER_TARGETS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (targets[i] - targets[j]).abs().max() > 0.01, (i, j)


def test_the_ensemble_teacher_gives_the_chosen_targets_logits():
    torch.manual_seed(0)
    members = [nn.Linear(4, 4) for _ in range(3)]
    ensemble = Ensemble(members).eval()
    x = torch.randn(5, 4)
    zs = torch.stack([m(x) for m in members])
    for how in config.TEACHER_TARGETS:
        torch.testing.assert_close(teacher_for(ensemble, 4.0, how)(x), ensemble_target(zs, 4.0, how))
    assert teacher_for(ensemble, 4.0, "output") is ensemble  # today's teacher, untouched


@pytest.mark.parametrize(
    "how,t,combine,expected",
    [
        ("softened-members", 4.0, None, "output"),  # one network: every target is its output
        ("mean-logit", 4.0, None, "output"),
        ("softened-members", 1.0, "prob", "output"),  # p̄ both
        ("softened-members", 4.0, "prob", "softened-members"),
        ("mean-logit", 1.0, "prob", "mean-logit"),  # the geometric mean differs even at T = 1
        ("mean-logit", 4.0, "logit", "output"),  # a logit ensemble's output
        ("softened-members", 1.0, "logit", "softened-members"),
    ],
)
def test_teacher_target_is_part_of_a_students_identity_only_where_it_changes_the_target(how, t, combine, expected):
    assert effective_target(how, t, combine) == expected


def test_the_default_fields_leave_every_digest_as_it_was_and_a_teacher_never_holds_them():
    base = Recipe()
    before = {k: v for k, v in base.fields_for("student").items() if k not in ("teacher_target", "joint_grad")}
    changed = base.replace(teacher_target="softened-members", joint_grad="lone")
    assert base.digest("student") != changed.digest("student")
    assert base.digest("train") == changed.digest("train")  # neither is a teacher's field
    assert "teacher_target" not in base.as_params("train") and "joint_grad" not in base.as_params("student")
    assert "joint_grad" in base.as_params("joint")
    assert set(base.fields_for("student")) - set(before) == {"teacher_target"}
    with pytest.raises(config.ConfigError, match="teacher_target"):
        Recipe(teacher_target="median")


# --- the joint model's gradient per member -----------------------------------------

K = 3


def _one_step(grad: str):
    """Member 0's classifier gradient in a joint model of K copies of one network, and a
    lone copy's on the same batch: with identical members the mean logit is the lone
    network's, so the lone gradient is the reference scale."""
    recipe = config.preset("smoke")
    torch.manual_seed(0)
    lone = models.build(recipe, 10).double().train()
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))
    joint = pack.joint([lone] * K, grad).double().train()
    loss = F.cross_entropy(joint(x), y)
    loss.backward()
    F.cross_entropy(lone(x), y).backward()
    members = joint.members
    with torch.no_grad():
        for p in members.parameters():
            p.copy_(p.grad)
    return loss.item(), members.network_states(), dict(lone.named_parameters())


@pytest.mark.parametrize("grad,scale", [("mean", 1 / K), ("lone", 1.0)])
def test_each_members_gradient_is_its_share_of_a_lone_networks(grad, scale):
    _, states, lone = _one_step(grad)
    for k, state in enumerate(states):
        for name, p in lone.items():
            torch.testing.assert_close(state[name], scale * p.grad, atol=1e-9, rtol=1e-7, msg=f"member {k}: {name}")


def test_the_gradient_scale_leaves_the_loss_as_it_was():
    assert _one_step("lone")[0] == pytest.approx(_one_step("mean")[0], rel=1e-12)
