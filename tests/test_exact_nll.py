"""NLL from the predictions artifact is the cross-entropy of the logits, even for images
whose float16 probability of the label rounds to 0 (issue 32, "NLL is floored by
storage"): the artifact keeps each label's float32 log-probability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_mlflow import calibration, predictions, tracking

# Hand-made logits, 10 classes. Label 0 for every image; the label's logit is `gap` nats
# below the top class. A gap of 20 or more puts p(label) below float16's smallest
# subnormal (6e-8): the float16 copy reads 0 and the old floor capped it at 16.1 nats.
GAPS = [0.0, 2.0, 9.0, 20.0, 35.0, 60.0, 80.0]


def _logits(gaps) -> torch.Tensor:
    z = torch.zeros(len(gaps), 10, dtype=torch.float64)
    z[:, 1] = 3.0  # the top class
    z[:, 0] = 3.0 - torch.tensor(gaps, dtype=torch.float64)
    z[:, 2:] = torch.linspace(-4, 1, 8, dtype=torch.float64)  # the rest, below the top
    return z


def _case():
    logits = _logits(GAPS)
    labels = np.zeros(len(GAPS), dtype=np.int64)
    # What training hands the writer: a float32 softmax of float32 logits (train.predict).
    probs = logits.float().softmax(1).numpy()
    reference = F.cross_entropy(logits, torch.from_numpy(labels), reduction="none").numpy()
    return probs, labels, reference


def test_the_case_has_images_whose_float16_copy_rounds_to_zero():
    probs, labels, _ = _case()
    assert (predictions.stored(probs)[np.arange(len(labels)), labels] == 0).sum() >= 3


def test_nll_from_the_artifact_is_the_cross_entropy_of_the_logits(tmp_path):
    probs, labels, reference = _case()
    path = predictions.save(
        tmp_path / "p.npz", probs, probs, labels, labels, pred_val=probs.argmax(1), pred_test=probs.argmax(1)
    )
    got = predictions.load(path)
    assert got.has_log_probs
    per_image = calibration.nll_of(got, "test")
    np.testing.assert_allclose(per_image, reference, rtol=1e-6, atol=1e-6)
    assert calibration.measure_of(got).nll == pytest.approx(reference.mean(), rel=1e-6)
    # The old reading (float16, floored) is biased low by far more than the tolerance.
    assert calibration.nll(got.probs(), got.labels()) < reference.mean() - 5


def test_the_predicted_class_log_probability_is_stored_too(tmp_path):
    probs, labels, _ = _case()
    pred = probs.argmax(1)
    path = predictions.save(tmp_path / "p.npz", probs, probs, labels, labels, pred_val=pred, pred_test=pred)
    got = predictions.load(path)
    top = torch.from_numpy(probs).double().log().max(1).values.numpy()
    np.testing.assert_allclose(got.logp_pred_test, top, rtol=1e-6, atol=1e-6)


def test_through_the_tracking_writer_and_reader_on_a_real_server(tracked):
    probs, labels, reference = _case()
    session = tracking.connect(tracked.experiment)
    run_id = session.client.create_run(session.experiment_id).info.run_id
    tracking.log_predictions_to(
        session, run_id, probs, probs, labels, labels, pred_val=probs.argmax(1), pred_test=probs.argmax(1)
    )
    session.client.set_terminated(run_id)
    got = tracking.load_predictions(run_id)
    np.testing.assert_allclose(calibration.nll_of(got, "val"), reference, rtol=1e-6, atol=1e-6)


def test_an_older_artifact_still_loads_and_says_it_lacks_log_probabilities(tmp_path):
    probs, labels, _ = _case()
    path = predictions.save(
        tmp_path / "p.npz", probs, probs, labels, labels, pred_val=probs.argmax(1), pred_test=probs.argmax(1)
    )
    with np.load(path) as z:
        older = {k: z[k] for k in z.files if not k.startswith("logp_")}
    older["format"] = np.array(predictions.FORMAT_WITHOUT_LOG_PROBS)
    np.savez(tmp_path / "old.npz", **older)
    old = predictions.load(tmp_path / "old.npz")
    assert not old.has_log_probs and old.logp_label("test") is None
    # its NLL is the floored float16 one, as before
    assert calibration.nll_of(old).mean() == pytest.approx(calibration.nll(old.probs(), old.labels()))


def test_an_ensembles_label_log_probability_is_the_log_of_its_members_mean_probability():
    """Members whose probabilities of the label lie far below float32's range (120 nats):
    logsumexp of their float32 log-softmaxes minus log K, against the float64 mean."""
    gaps = [[0.0, 30.0, 120.0], [5.0, 110.0, 125.0], [0.0, 0.0, 150.0]]  # (K = 3 members, N = 3)
    members = torch.stack([_logits(g) for g in zip(*gaps, strict=True)])  # (K, N, C)
    labels = torch.zeros(members.shape[1], dtype=torch.long)
    member_logp = members.float().log_softmax(-1)[:, torch.arange(len(labels)), labels].numpy()
    got = calibration.ensemble_logp_label(member_logp)
    reference = members.softmax(-1).mean(0)[torch.arange(len(labels)), labels].log().numpy()  # float64: no underflow
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)
    assert (np.exp(member_logp.astype(np.float32)) == 0).any()  # float32 probabilities would underflow here


def test_ensemble_size_reads_member_log_probabilities_where_given():
    probs, labels, reference = _case()
    member_probs = np.stack([predictions.stored(probs)] * 2)
    member_logp = np.stack([-reference] * 2)
    rows = calibration.ensemble_size(member_probs, labels, member_logp_label=member_logp)
    assert [r["nll_mean"] for r in rows] == pytest.approx([reference.mean()] * 2, rel=1e-9)
    assert math.isfinite(rows[0]["nll_max"])
