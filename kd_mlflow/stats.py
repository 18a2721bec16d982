"""Uncertainty of the study's gains and figures of its mechanism, from predictions.

The report's gains are about one point (KD +1.0, SD about +0.7) on one test set of
10,000 images, where one accuracy has a sampling error of about 0.35 points. This
module puts an interval on every gain and measures *why* an ensemble and a distilled
student differ, from per-image correctness and predicted probabilities.

Pure numpy: no torch, no MLflow, no scipy (scipy is the reference in the tests).
Inputs are plain arrays, one entry per test image in the same order for every model
(check :func:`kd_mlflow.predictions.labels_digest` first); outputs are small frozen
dataclasses with ``as_dict()``. Gains are in percentage points, b minus a.

Two kinds of uncertainty, kept apart:

* :func:`paired_bootstrap` - the test set's sampling error, models held fixed: "would
  this gain hold on another 10,000 images from the same distribution?"
* :func:`seed_interval` - the spread over training seeds, test set held fixed: "would
  it hold for another training run?"
* :func:`hierarchical_bootstrap` - both at once, for a gain between two groups of runs:
  the runs resampled, then the test images shared by all of them (what
  :func:`kd_mlflow.gains.interval` gives a gain where both sides are several runs).

The image-only intervals of the study's gains, with ``C`` a (k, N) boolean matrix of the k single models'
correctness and ``e``, ``kd`` (N,) vectors::

    ensemble minus mean single model     paired_bootstrap(C, e)
    KD student minus mean single model   paired_bootstrap(C, kd)
    one SD student minus its teacher     paired_bootstrap(C[i], SD[i])
    mean over pairs of (SD - teacher)    paired_bootstrap(C, SD)       # rows paired i-to-i
    SD ensemble minus ensemble           paired_bootstrap(e, e_sd)

(the mean over pairs of a difference is the difference of the means, so the last-but-one
needs no pairing of rows; only the images are paired.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

_CHUNK_BYTES = 64 * 2**20  # memory for one chunk of resamples (indices + gathered values)
KL_EPS = 1e-7  # probability floor for KL; float16 flushes below ~6e-8 to 0


# --- results -------------------------------------------------------------------


class _Record:
    def as_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass


@dataclass(frozen=True)
class BootstrapInterval(_Record):
    """A paired-bootstrap percentile interval of a gain (percentage points)."""

    estimate: float  # b - a on the full test set
    lo: float
    hi: float
    level: float  # e.g. 0.95
    n_images: int
    n_resamples: int
    seed: int

    def __str__(self) -> str:
        return fmt_interval(self.estimate, self.lo, self.hi)


@dataclass(frozen=True)
class SeedInterval(_Record):
    """Mean over seeds and its Student-t interval; lo/hi/std are NaN when n < 2."""

    mean: float
    lo: float
    hi: float
    std: float  # sample standard deviation (ddof=1)
    n: int
    level: float

    def __str__(self) -> str:
        return fmt_interval(self.mean, self.lo, self.hi)


@dataclass(frozen=True)
class McNemar(_Record):
    """Exact McNemar test; b and c are the two discordant counts."""

    p_value: float
    b: int  # teacher right, student wrong
    c: int  # teacher wrong, student right


@dataclass(frozen=True)
class Disagreement(_Record):
    not_unanimous: float  # share of images where the members' top-1 are not all equal
    pairwise: float  # mean over member pairs of the share of images they differ on
    n_members: int
    n_images: int


@dataclass(frozen=True)
class Agreement(_Record):
    top1: float  # share of images where teacher and student predict the same class
    kl: float  # mean over images of KL(teacher || student), nats
    n_images: int
    eps: float  # the probability floor used for the KL


@dataclass(frozen=True)
class Retention(_Record):
    """Share of the ensemble's gain that the KD student keeps (1.0 = all of it)."""

    estimate: float
    lo: float  # NaN when the ensemble's gain interval includes 0
    hi: float
    level: float
    kd_gain: BootstrapInterval  # KD - mean single, points
    ensemble_gain: BootstrapInterval  # ensemble - mean single, points
    n_undefined: int  # resamples whose ensemble gain was exactly 0 (dropped)

    def __str__(self) -> str:
        return fmt_interval(self.estimate, self.lo, self.hi)


@dataclass(frozen=True)
class Rescued(_Record):
    share: float  # of the rescued images, the share the student gets right
    n_images: int  # images the ensemble gets right and most members get wrong
    n_student_right: int
    member_share: float  # the same share for the members, averaged (< 0.5 by construction)


# --- inputs --------------------------------------------------------------------


def _as_correct(x, name: str) -> np.ndarray:
    """A boolean (N,) or (k, N) array as a float64 (k, N) matrix of 0/1."""
    arr = np.asarray(x)
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1) per image, got {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N,) or (k, N) with k, N >= 1, got {arr.shape}")
    return arr.astype(np.float64)


def _same_images(**arrays: np.ndarray) -> int:
    sizes = {name: a.shape[-1] for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs must cover the same images, got sizes {sizes}")
    return next(iter(sizes.values()))


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


# --- the paired bootstrap --------------------------------------------------------


def _resampled_means(columns: np.ndarray, n_resamples: int, seed: int | np.random.Generator) -> np.ndarray:
    """Means of per-image values over bootstrap resamples of the images.

    ``columns`` is (m, N): m per-image quantities. Every resample draws N image
    indices with replacement, the same indices for all m quantities; returns
    (n_resamples, m). Resamples are drawn in chunks so that memory stays near
    ``_CHUNK_BYTES`` whatever n_resamples is (about 0.7 s for 10,000 x 10,000 on one
    core). The chunk size depends on N only, so the same inputs and seed draw the same
    indices (one seeded ``np.random.Generator`` stream, consumed in order; ``seed`` may be
    a Generator already partly consumed).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    m, n = columns.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_BYTES // (16 * n))  # int64 indices + one gathered float64 copy
    out = np.empty((n_resamples, m))
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        for j in range(m):  # np.take per row: ~5x faster than columns[:, idx]
            out[start : start + size, j] = np.take(columns[j], idx).mean(axis=1)
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(
    correct_a, correct_b, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> BootstrapInterval:
    """Gain of b over a in accuracy (percentage points) with a paired bootstrap interval.

    ``correct_a`` and ``correct_b`` are boolean per test image, shape (N,) for one model
    or (k, N) for a group whose accuracy is the mean of its k models' accuracies. With
    s_a(i) the mean over a's rows of image i's correctness (likewise s_b)::

        gain = 100 * (mean_i s_b(i) - mean_i s_a(i))

    Each of ``n_resamples`` resamples draws N images with replacement, the SAME images
    for both sides (the pairing removes the per-image difficulty both sides share), and
    recomputes the gain; the interval is the (1-level)/2 and (1+level)/2 percentiles of
    those gains: the bootstrap percentile interval (Efron & Tibshirani, *An Introduction
    to the Bootstrap*, 1993, ch. 13). It measures the test set's sampling error only:
    the models are held fixed. Same inputs and seed, same interval.
    """
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    return _paired(a, b, 100.0, n_resamples, seed, level)


def paired_bootstrap_values(values_a, values_b, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95):
    """:func:`paired_bootstrap` for a per-image quantity other than correctness (e.g. each
    image's negative log-likelihood): the difference of the mean of b over a, no scaling,
    with the same paired resampling of the images (the same seed draws the same images).
    ``values_a`` and ``values_b`` are finite floats, (N,) or (k, N) (rows averaged)."""
    a, b = _finite_rows(values_a, values_b)
    return _paired(a, b, 1.0, n_resamples, seed, level)


def _finite_rows(values_a, values_b) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as float64 (rows, images) arrays of finite values, or ValueError."""
    a, b = (np.atleast_2d(np.asarray(v, dtype=np.float64)) for v in (values_a, values_b))
    if a.ndim != 2 or b.ndim != 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"values must be finite (N,) or (runs, N) arrays, got {a.shape} and {b.shape}")
    return a, b


def _paired(a: np.ndarray, b: np.ndarray, scale: float, n_resamples: int, seed: int, level: float):
    _check_level(level)
    n = _same_images(a=a, b=b)
    d = (b.mean(axis=0) - a.mean(axis=0))[None, :]  # per-image difference, (1, N)
    diffs = scale * _resampled_means(d, n_resamples, seed)[:, 0]
    lo, hi = _percentiles(diffs, level)
    return BootstrapInterval(float(scale * d.mean()), lo, hi, level, n, n_resamples, seed)


# --- over seeds and images together -------------------------------------------------


@dataclass(frozen=True)
class HierarchicalInterval(_Record):
    """A two-level (seeds, then images) bootstrap percentile interval of a gain between
    two groups of runs."""

    estimate: float  # mean over b's runs minus mean over a's runs, on the full test set
    lo: float
    hi: float
    level: float
    n_runs_a: int
    n_runs_b: int
    n_images: int
    paired: bool
    n_resamples: int
    seed: int

    def __str__(self) -> str:
        return fmt_interval(self.estimate, self.lo, self.hi)


def hierarchical_bootstrap(
    values_a,
    values_b,
    *,
    paired: bool,
    scale: float = 1.0,
    n_resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> HierarchicalInterval:
    """Gain of group b over group a, scale * (mean_runs_b mean_images - mean_runs_a
    mean_images), with an interval over seeds and test images together.

    ``values_a`` (S_a, N) and ``values_b`` (S_b, N): one row per run (a seed), one column
    per test image, e.g. correctness as 0/1 with ``scale=100`` (percentage points) or each
    image's NLL. ``paired``: row j of a and row j of b belong together (an SD student and
    its teacher; S_a == S_b) and are drawn together; else each group's runs are drawn
    from its own.

    Each resample draws, from one seeded stream and in this order for all resamples: the
    runs, (R, S_a) indices with replacement (then (R, S_b) for unpaired groups), then per
    resample N image indices with replacement, the same images for every run of both
    groups: the runs were all measured on one test set, so a fresh draw per run would
    treat their test sets as independent and understate the images' share. This is the
    bootstrap of a crossed (runs x images) design, Owen (2007), "The pigeonhole
    bootstrap", Ann. Appl. Stat. 1(2); its interval is the percentile one (Efron &
    Tibshirani 1993, ch. 13). Same inputs and seed, same interval.
    """
    _check_level(level)
    a, b = _finite_rows(values_a, values_b)
    n = _same_images(a=a, b=b)
    if paired and len(a) != len(b):
        raise ValueError(f"paired groups need as many runs each, got {len(a)} and {len(b)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    runs_a = rng.integers(0, len(a), size=(n_resamples, len(a)))
    runs_b = runs_a if paired else rng.integers(0, len(b), size=(n_resamples, len(b)))
    # every run's mean over each resample's images, (R, S): the runs drawn then pick columns
    run_means = _resampled_means(np.concatenate([a, b]), n_resamples, rng)
    mean_a = np.take_along_axis(run_means[:, : len(a)], runs_a, axis=1).mean(axis=1)
    mean_b = np.take_along_axis(run_means[:, len(a) :], runs_b, axis=1).mean(axis=1)
    lo, hi = _percentiles(scale * (mean_b - mean_a), level)
    estimate = scale * (b.mean() - a.mean())
    return HierarchicalInterval(float(estimate), lo, hi, level, len(a), len(b), n, paired, n_resamples, seed)


# --- over seeds ------------------------------------------------------------------


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 ...
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 ...
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level for Student's t with ``df`` degrees of freedom:
    the two-sided critical value, e.g. 2.776 for level 0.95, df 4. Bisection on the
    closed-form CDF for integer df, to ~1e-12 relative."""
    _check_level(level)
    if not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def seed_interval(values, level: float = 0.95) -> SeedInterval:
    """Mean over seeds with a Student-t interval: mean +- t_{(1+level)/2, n-1} * s / sqrt(n).

    ``values`` is one number per seed (e.g. test accuracy or a gain). s is the sample
    standard deviation (ddof=1). Assumes the per-seed values are independent draws
    from a normal distribution; with n = 5 seeds the interval is wide by design
    (t = 2.776). For n < 2 there is no spread to estimate: std, lo and hi are NaN
    (and for n = 0 the mean is NaN too).
    """
    _check_level(level)
    x = np.asarray(values, dtype=np.float64).ravel()
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return SeedInterval(mean, math.nan, math.nan, math.nan, n, level)
    std = float(x.std(ddof=1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return SeedInterval(mean, mean - half, mean + half, std, n, level)


# --- paired test ------------------------------------------------------------------


def mcnemar_exact(correct_teacher, correct_student) -> McNemar:
    """Exact (binomial) McNemar test that teacher and student are equally accurate.

    Only the discordant images count: b = teacher right and student wrong, c = teacher
    wrong and student right. Under the null hypothesis each discordant image is b or c
    with probability 1/2, so with n = b + c and k = min(b, c)::

        p = min(1, 2 * sum_{i=0..k} C(n, i) / 2**n)       (p = 1 when n = 0)

    the two-sided exact form of McNemar's test (McNemar 1947, Psychometrika 12:153),
    computed in exact integer arithmetic. Equals scipy.stats.binomtest(b, n, 0.5).pvalue.
    """
    t = _as_correct(correct_teacher, "correct_teacher")
    s = _as_correct(correct_student, "correct_student")
    if t.shape[0] != 1 or s.shape[0] != 1:
        raise ValueError("mcnemar_exact compares two single models: pass (N,) arrays")
    _same_images(correct_teacher=t, correct_student=s)
    t, s = t[0].astype(bool), s[0].astype(bool)
    b, c = int((t & ~s).sum()), int((~t & s).sum())
    n, k = b + c, min(b, c)
    if 2 * k >= n:  # includes n == 0: the observed split is the most likely one
        return McNemar(1.0, b, c)
    tail, term = 0, 1  # sum of C(n, i) for i <= k, term = C(n, i)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    # A float division of big integers is correctly rounded (underflows to 0.0 only
    # when the p-value is below ~1e-308).
    return McNemar(min(1.0, 2 * tail / 2**n), b, c)


# --- mechanism figures ---------------------------------------------------------------


def _top1(x, name: str, ndim_probs: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == ndim_probs:  # probabilities: take the top-1 class
        return arr.argmax(axis=-1)
    if arr.ndim == ndim_probs - 1 and np.issubdtype(arr.dtype, np.integer):
        return arr
    raise ValueError(f"{name}: expected integer predictions or probabilities, got {arr.dtype} {arr.shape}")


def disagreement(member_preds) -> Disagreement:
    """How much an ensemble's members disagree, on top-1 predictions.

    ``member_preds`` is (k, N) integer classes, or (k, N, C) probabilities (their argmax;
    ties go to the lowest class). With y_m(i) member m's class for image i::

        not_unanimous = mean_i [ not all y_m(i) equal ]
        pairwise      = mean over pairs m < m' of mean_i [ y_m(i) != y_m'(i) ]

    An ensemble can only beat its members where they disagree; the report's view
    ("multi-view" data) says independently trained members pick up different features.
    """
    y = _top1(member_preds, "member_preds", 3)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"member_preds needs k >= 2 members and N >= 1 images, got {y.shape}")
    k, n = y.shape
    not_unanimous = float((y != y[0]).any(axis=0).mean())
    pairs = [float((y[i] != y[j]).mean()) for i in range(k) for j in range(i + 1, k)]
    return Disagreement(not_unanimous, float(np.mean(pairs)), k, n)


def agreement(teacher_probs, student_probs, eps: float = KL_EPS) -> Agreement:
    """How closely a student follows its teacher: top-1 agreement and mean KL.

    Both are (N, C) probabilities (e.g. float16 from an artifact). With p the teacher's
    and q the student's rows::

        top1 = mean_i [ argmax p_i == argmax q_i ]
        kl   = mean_i sum_c p_ic * ln(p_ic / q_ic)        (nats)

    A float16 probability below ~6e-8 reads back as 0, which would make ln(p/q)
    infinite: both rows are clamped to at least ``eps`` and renormalised to sum 1, in
    float64, before the KL. The clamp bounds each log-ratio by ln(1/eps) ~ 16 nats and
    changes a KL between well-behaved rows by about eps * C.
    """
    p, q = np.asarray(teacher_probs), np.asarray(student_probs)
    if p.ndim != 2 or p.shape != q.shape or p.shape[0] < 1:
        raise ValueError(f"teacher and student probabilities must be equal (N, C), got {p.shape}, {q.shape}")
    top1 = float((p.argmax(axis=1) == q.argmax(axis=1)).mean())
    p, q = (_clamp(a, eps) for a in (p, q))
    kl = float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())
    return Agreement(top1, kl, p.shape[0], eps)


def _clamp(probs: np.ndarray, eps: float) -> np.ndarray:
    x = np.maximum(probs.astype(np.float64), eps)
    return x / x.sum(axis=1, keepdims=True)


def retention(
    correct_single, correct_ensemble, correct_kd, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> Retention:
    """How much of the ensemble's gain the KD student keeps, with a bootstrap interval.

    ``correct_single`` is (k, N), the single models the ensemble is made of;
    ``correct_ensemble`` and ``correct_kd`` are (N,) (or (k', N), averaged). With
    accuracies as in :func:`paired_bootstrap`::

        retention = (KD - mean single) / (ensemble - mean single)

    1 means the student keeps all of the ensemble's gain, 0 none of it. The interval
    is the paired bootstrap percentile interval (Efron & Tibshirani 1993) of the ratio
    computed per resample, numerator and denominator on the same resampled images.

    A ratio is only meaningful when its denominator is clearly away from 0. So, by
    choice: if the ensemble gain's own interval at ``level`` includes 0, the bounds
    are NaN (the ratio is unbounded at this level), while the point estimate is still
    reported (NaN if the gain is exactly 0). Resamples whose ensemble gain is exactly
    0 are dropped and counted in ``n_undefined``; they can only fall in the tail
    outside the denominator's interval, so they do not move a reported bound much.
    An ensemble gain whose interval lies wholly below 0 gives a ratio with bounds, but
    one that reads backwards (the "gain" is a loss); the table should say so.
    """
    _check_level(level)
    s = _as_correct(correct_single, "correct_single")
    e = _as_correct(correct_ensemble, "correct_ensemble")
    kd = _as_correct(correct_kd, "correct_kd")
    n = _same_images(correct_single=s, correct_ensemble=e, correct_kd=kd)
    base = s.mean(axis=0)
    cols = np.stack([kd.mean(axis=0) - base, e.mean(axis=0) - base])  # (2, N)
    means = 100 * _resampled_means(cols, n_resamples, seed)  # (R, 2)
    est_num, est_den = (float(100 * c.mean()) for c in cols)
    gains = [
        BootstrapInterval(est, *_percentiles(means[:, j], level), level, n, n_resamples, seed)
        for j, est in enumerate((est_num, est_den))
    ]
    estimate = est_num / est_den if est_den != 0 else math.nan
    defined = means[:, 1] != 0
    n_undefined = int((~defined).sum())
    if gains[1].lo <= 0 <= gains[1].hi or not defined.any():
        lo = hi = math.nan
    else:
        lo, hi = _percentiles(means[defined, 0] / means[defined, 1], level)
    return Retention(estimate, lo, hi, level, gains[0], gains[1], n_undefined)


def rescued_share(correct_members, correct_ensemble, correct_student) -> Rescued:
    """Of the images the ensemble rescues, the share the KD student gets right.

    ``correct_members`` is (k, N); ``correct_ensemble`` and ``correct_student`` (N,).
    The rescued images are those the ensemble gets right while a strict majority of
    its members get wrong (more than k/2 wrong)::

        R     = { i : ensemble right on i and #{m : member m wrong on i} > k / 2 }
        share = |{ i in R : student right on i }| / |R|          (NaN if R is empty)

    Such images are what the ensemble knows that most single models do not; a KD
    student that gets many of them right has learned more than any single model
    (``member_share``, the members' own average on R, is the baseline).
    """
    m = _as_correct(correct_members, "correct_members").astype(bool)
    e = _as_correct(correct_ensemble, "correct_ensemble").astype(bool)
    st = _as_correct(correct_student, "correct_student").astype(bool)
    if e.shape[0] != 1 or st.shape[0] != 1:
        raise ValueError("correct_ensemble and correct_student must be (N,) arrays")
    _same_images(correct_members=m, correct_ensemble=e, correct_student=st)
    k = m.shape[0]
    rescued = e[0] & (2 * (~m).sum(axis=0) > k)
    count = int(rescued.sum())
    if count == 0:
        return Rescued(math.nan, 0, 0, math.nan)
    right = int(st[0][rescued].sum())
    return Rescued(right / count, count, right, float(m[:, rescued].mean()))


# --- formatting ------------------------------------------------------------------


def _missing(x) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def fmt_interval(gain, lo, hi, digits: int = 2) -> str:
    """``"+0.87 [+0.41, +1.32]"``; ``"+0.87 [n/a]"`` when a bound is None or NaN."""
    if _missing(gain):
        return "n/a"
    head = f"{gain:+.{digits}f}"
    if _missing(lo) or _missing(hi):
        return f"{head} [n/a]"
    return f"{head} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
