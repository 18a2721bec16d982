"""Calibration and ensemble size, from predicted probabilities: the measures the
deep-ensembles literature judges ensembles and distilled students by besides accuracy
(Lakshminarayanan et al. 2017; Guo et al. 2017 for ECE with 15 bins).

Pure numpy: no torch, no MLflow (torchmetrics is the reference in the tests). Inputs are
(N, C) probabilities, e.g. the float16 ones of a predictions artifact, read in float64,
and (N,) labels; a run logs these measures computed from the very probabilities its
artifact holds, so the logged metric and the one recomputed from the artifact agree.
NLL is the exception: float16 cannot hold a small probability, so it is read from the
artifact's float32 log-probability of each label where the artifact has one
(:func:`nll_of`, :func:`measure_of`; ``logp_label`` below).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np

from .schema import CALIBRATION_METRICS
from .stats import KL_EPS

N_BINS = 15  # Guo et al. 2017
MAX_SUBSETS = 200  # ensemble size: above this many subsets of size k, a seeded sample
NLL_EPS = KL_EPS  # probability floor for the log: float16 flushes below ~6e-8 to 0


@dataclass(frozen=True)
class Calibration:
    nll: float  # nats per image
    ece: float  # 0..1
    brier: float  # 0..2
    n_images: int

    def as_metrics(self) -> dict:
        """The run metrics: test_nll, test_ece, test_brier."""
        return dict(zip(CALIBRATION_METRICS, (self.nll, self.ece, self.brier), strict=True))

    def as_dict(self) -> dict:
        return asdict(self)


def _inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] < 1 or y.shape != (p.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"expected (N, C) probabilities and N integer labels, got {p.shape} and {y.dtype} {y.shape}")
    return p, y.astype(np.int64)


def nll_per_image(probs, labels, logp_label=None) -> np.ndarray:
    """Each image's negative log-likelihood, nats: -logp_label, the log-probability of its
    label from the full-precision outputs, where given (exact); else -ln max(p_i[y_i],
    NLL_EPS), whose floor keeps a float16 probability that read back as 0 finite but caps
    a confidently wrong image at ~16.1 nats (the artifacts of formats 1 and 2)."""
    p, y = _inputs(probs, labels)
    if logp_label is not None:
        lp = np.asarray(logp_label, dtype=np.float64)
        if lp.shape != y.shape:
            raise ValueError(f"expected {len(y)} log-probabilities, got {lp.shape}")
        return -lp
    return -np.log(np.maximum(p[np.arange(len(y)), y], NLL_EPS))


def nll(probs, labels, logp_label=None) -> float:
    """Negative log-likelihood, nats: the mean over images of :func:`nll_per_image`."""
    return float(nll_per_image(probs, labels, logp_label).mean())


def nll_of(pred, split: str = "test") -> np.ndarray:
    """Each image's NLL from a :class:`kd_mlflow.predictions.Predictions`: exact where the
    file holds log-probabilities (``pred.has_log_probs``), else floored."""
    return nll_per_image(pred.probs(split), pred.labels(split), pred.logp_label(split))


def ensemble_logp_label(member_logp_label) -> np.ndarray:
    """log of the mean of K members' probabilities of the label, (K, N) -> (N,), computed
    stably: logsumexp_k(log p_k[y]) - log K (no member's probability is exponentiated
    on its own, so none underflows)."""
    lp = np.asarray(member_logp_label, dtype=np.float64)
    top = lp.max(axis=0)
    return top + np.log(np.exp(lp - top).sum(axis=0)) - math.log(len(lp))


def brier(probs, labels) -> float:
    """Brier score (Brier 1950, multiclass): mean over images of the sum over classes of
    (p_ic - [c == y_i])^2. 0 is perfect; at most 2."""
    p, y = _inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def reliability(probs, labels, pred=None, n_bins: int = N_BINS) -> dict:
    """The top-label reliability bins: per bin, the mean confidence, the accuracy and the
    number of images (bins without images have NaN means).

    The confidence of image i is max_c p_ic; it is right when its predicted class
    (``pred``, the stored one; else the probabilities' argmax) is its label. Bins are
    equal-width, [m/n_bins, (m+1)/n_bins) for m = 0..n_bins-1, and a confidence of exactly
    1 has a bin of its own, as torchmetrics bins (``MulticlassCalibrationError``): with
    float16 probabilities every confidence above 1 - 2**-12 reads back as 1.
    """
    p, y = _inputs(probs, labels)
    top = p.argmax(axis=1) if pred is None else np.asarray(pred)
    conf = p.max(axis=1)
    right = (top == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    at = np.searchsorted(edges, conf, side="right") - 1  # bucketize(right=True) - 1, as torchmetrics
    count = np.bincount(at, minlength=n_bins + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "confidence": np.bincount(at, conf, minlength=n_bins + 1) / count,
            "accuracy": np.bincount(at, right, minlength=n_bins + 1) / count,
            "count": count,
            "edges": edges,
        }


def ece(probs, labels, pred=None, n_bins: int = N_BINS) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017), top-label, L1:
    sum over the :func:`reliability` bins of |accuracy - confidence| * n_bin / N."""
    bins = reliability(probs, labels, pred, n_bins)
    used = bins["count"] > 0
    gap = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float((gap * bins["count"][used]).sum() / bins["count"].sum())


def measure(probs, labels, pred=None, logp_label=None) -> Calibration:
    """NLL (exact where ``logp_label`` is given), ECE (15 bins) and Brier of one model's
    probabilities."""
    return Calibration(nll(probs, labels, logp_label), ece(probs, labels, pred), brier(probs, labels), len(labels))


def measure_of(pred, split: str = "test") -> Calibration:
    """:func:`measure` of a :class:`kd_mlflow.predictions.Predictions`."""
    return measure(pred.probs(split), pred.labels(split), pred.top1(split), pred.logp_label(split))


# --- ensemble size -------------------------------------------------------------------


def subsets(n: int, k: int, max_subsets: int = MAX_SUBSETS, seed: int = 0) -> list[tuple[int, ...]]:
    """The subsets of size k of n members an ensemble-size point averages over: all of
    them when there are at most ``max_subsets``, else ``max_subsets`` distinct ones drawn
    at random (seeded: the same n, k and seed give the same subsets)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if math.comb(n, k) <= max_subsets:
        return list(combinations(range(n), k))
    rng = np.random.default_rng([seed, n, k])
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < max_subsets:
        chosen[tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))] = None
    return list(chosen)


def ensemble_size(
    member_probs, labels, member_pred=None, max_subsets: int = MAX_SUBSETS, seed: int = 0, member_logp_label=None
) -> list[dict]:
    """Test accuracy (%) and NLL of the average of k members' probabilities, k = 1..n:
    per k the mean, min and max over :func:`subsets`.

    ``member_probs`` is (n, N, C). A subset of one is the member itself, so its accuracy
    counts its stored classes (``member_pred``, (n, N)) where given: the k = 1 mean is the
    members' mean logged accuracy. Above one, the class is the argmax of the averaged
    probabilities (the report's ensemble), as the probabilities were stored. NLL is
    exact where ``member_logp_label`` ((n, N), each member's log-probability of the
    label) is given: :func:`ensemble_logp_label` of the subset.
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"member_probs must be (n, N, C), got {probs.shape}")
    y = _inputs(probs[0], labels)[1]
    rows = []
    for k in range(1, len(probs) + 1):
        accs, nlls = [], []
        for s in subsets(len(probs), k, max_subsets, seed):
            avg = probs[list(s)].mean(axis=0)
            top = member_pred[s[0]] if k == 1 and member_pred is not None else avg.argmax(axis=1)
            accs.append(100.0 * float((np.asarray(top) == y).mean()))
            logp = None if member_logp_label is None else ensemble_logp_label(np.asarray(member_logp_label)[list(s)])
            nlls.append(nll(avg, y, logp))
        rows.append(
            {
                "k": k,
                "n_subsets": len(accs),
                "acc_mean": float(np.mean(accs)),
                "acc_min": min(accs),
                "acc_max": max(accs),
                "nll_mean": float(np.mean(nlls)),
                "nll_min": min(nlls),
                "nll_max": max(nlls),
            }
        )
    return rows
