"""Predictions as a run artifact that loads without pickle.

One ``.npz`` per run holds the model's softmax probabilities and predicted classes on
the validation and test images, in the data's order, with the labels and their
digests::

    format         str     "kd-mlflow-predictions/3"
    num_classes    int64   C
    probs_val      float16 (N_val, C)    softmax probabilities
    probs_test     float16 (N_test, C)
    pred_val       int16   (N_val,)      predicted class, from the full-precision outputs
    pred_test      int16   (N_test,)
    labels_val     int16   (N_val,)      so statistics need the artifacts alone
    labels_test    int16   (N_test,)
    digest_val     str     labels_digest(labels_val)
    digest_test    str     labels_digest(labels_test)
    logp_label_val float32 (N_val,)      log-probability of the label, from the full-precision outputs
    logp_label_test float32 (N_test,)
    logp_pred_val  float32 (N_val,)      log-probability of the predicted class
    logp_pred_test float32 (N_test,)

float16 because 10,000 x 10 probabilities are 200 kB instead of 400 kB and the
statistics need no more: a probability is kept to ~3 significant digits. That can tie
two classes the full-precision outputs told apart, so the predicted class is stored
beside them, computed with the logged accuracy: accuracy from the artifact is the
run's logged accuracy.

NLL needs more than float16: below ~6e-5 a float16 probability is subnormal and below
~3e-8 it is 0, so a confidently wrong image's -log p would be floored. Each image's
log-probability of its label (and of its predicted class) is therefore kept in float32,
taken from the full-precision outputs (:func:`log_probs_of`). Files of format 2
have none (:attr:`Predictions.has_log_probs` is False): their NLL is the floored one.

The digest is what a reader compares to be sure that two runs' predictions are on the
same images in the same order (a paired test on misaligned images is meaningless).
No MLflow, no torch: plain numpy arrays in and out.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "kd-mlflow-predictions/3"
FORMAT_WITHOUT_LOG_PROBS = "kd-mlflow-predictions/2"
SPLITS = ("val", "test")
_KEYS_WITHOUT_LOG_PROBS = frozenset(
    {"format", "num_classes"} | {f"{k}_{s}" for k in ("probs", "pred", "labels", "digest") for s in SPLITS}
)
_KEYS = {
    FORMAT: _KEYS_WITHOUT_LOG_PROBS | {f"logp_{k}_{s}" for k in ("label", "pred") for s in SPLITS},
    FORMAT_WITHOUT_LOG_PROBS: _KEYS_WITHOUT_LOG_PROBS,
}
_ROW_SUM_TOL = 1e-2  # rows of a softmax sum to 1; logits or log-probabilities do not


def labels_digest(labels) -> str:
    """sha256 of the labels as little-endian int64 bytes, first 16 hex characters.

    Independent of the dtype the labels arrive in, so int16 labels read back from an
    artifact give the digest of the int64 tensor they were saved from.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Predictions:
    """What :func:`load` returns. Arrays are read-only."""

    probs_val: np.ndarray  # float16 (N_val, C)
    probs_test: np.ndarray  # float16 (N_test, C)
    labels_val: np.ndarray  # int16 (N_val,)
    labels_test: np.ndarray  # int16 (N_test,)
    digest_val: str
    digest_test: str
    num_classes: int
    pred_val: np.ndarray  # int16 (N_val,)
    pred_test: np.ndarray
    logp_label_val: np.ndarray | None = None  # float32 (N_val,); None in a file before format 3
    logp_label_test: np.ndarray | None = None
    logp_pred_val: np.ndarray | None = None
    logp_pred_test: np.ndarray | None = None

    @property
    def has_log_probs(self) -> bool:
        """Whether the file holds float32 log-probabilities (else NLL is read from the
        float16 probabilities, floored: see :func:`kd_mlflow.calibration.nll_of`)."""
        return self.logp_label_test is not None

    def logp_label(self, split: str = "test") -> np.ndarray | None:
        """float32 log-probability of each image's label, or None (an older file)."""
        return getattr(self, f"logp_label_{_split(split)}")

    def probs(self, split: str = "test") -> np.ndarray:
        return getattr(self, f"probs_{_split(split)}")

    def labels(self, split: str = "test") -> np.ndarray:
        return getattr(self, f"labels_{_split(split)}")

    def digest(self, split: str = "test") -> str:
        return getattr(self, f"digest_{_split(split)}")

    def top1(self, split: str = "test") -> np.ndarray:
        """Predicted class per image, from the full-precision outputs (the float16
        probabilities' argmax may break a tie another way than the model did)."""
        return getattr(self, f"pred_{_split(split)}")

    def correct(self, split: str = "test") -> np.ndarray:
        """Boolean per image: the top-1 prediction equals the label."""
        return self.top1(split) == self.labels(split)


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _check_probs(name: str, probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    y = np.asarray(labels)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{name}: probabilities must be a 2-D float array (N, C), got {p.dtype} {p.shape}")
    if y.ndim != 1 or len(y) != len(p) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be {len(p)} integers, got {y.dtype} {y.shape}")
    p64 = p.astype(np.float64)
    if not np.isfinite(p64).all() or (p64 < 0).any():
        raise ValueError(f"{name}: probabilities must be finite and >= 0")
    if len(p) and np.abs(p64.sum(axis=1) - 1).max() > _ROW_SUM_TOL:
        raise ValueError(f"{name}: rows must sum to 1 (softmax probabilities, not logits)")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"{name}: labels must lie in [0, {p.shape[1]})")
    return p, y


def _check_pred(name: str, pred, probs: np.ndarray) -> np.ndarray:
    c = np.asarray(pred)
    if c.shape != (len(probs),) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{name}: predicted classes must be {len(probs)} integers, got {c.dtype} {c.shape}")
    if len(c) and (c.min() < 0 or c.max() >= probs.shape[1]):
        raise ValueError(f"{name}: predicted classes must lie in [0, {probs.shape[1]})")
    return c


def stored(probs) -> np.ndarray:
    """Probabilities as a predictions file stores them (float16): what every figure
    computed from the file sees, and so what a run's logged calibration is computed from."""
    return np.asarray(probs).astype(np.float16)


def log_probs_of(probs, labels, pred, log_probs=None) -> tuple[np.ndarray, np.ndarray]:
    """float32 log-probabilities of the labels and of the predicted classes, (N,) each.

    From ``log_probs`` (N, C) where the caller has them (a log-softmax of the logits:
    exact at any confidence); else from the full-precision ``probs``, which is exact to
    float32 rounding down to p ~ 1e-38 (a logit gap of ~87 nats): a float32 softmax that
    underflowed to 0 reads as the smallest positive float32 (-103.3 nats), not -inf.
    """
    rows = np.arange(len(labels))
    if log_probs is not None:
        lp = np.asarray(log_probs, dtype=np.float64)
        if lp.shape != np.shape(probs):
            raise ValueError(f"log-probabilities must be {np.shape(probs)}, got {lp.shape}")
    else:
        tiny = np.nextafter(np.float32(0), np.float32(1))  # 1.4e-45
        lp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), tiny))
    return lp[rows, labels].astype(np.float32), lp[rows, pred].astype(np.float32)


def save(
    path,
    probs_val,
    probs_test,
    labels_val,
    labels_test,
    *,
    pred_val,
    pred_test,
    log_probs_val=None,
    log_probs_test=None,
) -> Path:
    """Write the predictions to ``path`` (an ``.npz``, written whole or not at all).

    Probabilities (N, C), any float dtype, are stored as float16; predicted classes (the
    argmax of the full-precision outputs) and labels as int16, the labels with their
    :func:`labels_digest`; the log-probabilities of the labels and of the predicted
    classes as float32 (:func:`log_probs_of`, from ``log_probs_*`` where given, else from
    the probabilities as passed, before float16). Returns the path.
    """
    path = Path(path)
    pv, yv = _check_probs("probs_val", probs_val, labels_val)
    pt, yt = _check_probs("probs_test", probs_test, labels_test)
    cv, ct = _check_pred("pred_val", pred_val, pv), _check_pred("pred_test", pred_test, pt)
    if pv.shape[1] != pt.shape[1]:
        raise ValueError(f"val has {pv.shape[1]} classes but test has {pt.shape[1]}")
    if pv.shape[1] > np.iinfo(np.int16).max:
        raise ValueError(f"too many classes for int16 labels: {pv.shape[1]}")
    lv_label, lv_pred = log_probs_of(pv, yv, cv, log_probs_val)
    lt_label, lt_pred = log_probs_of(pt, yt, ct, log_probs_test)
    arrays = {
        "format": np.array(FORMAT),
        "num_classes": np.array(pv.shape[1], dtype=np.int64),
        "probs_val": stored(pv),
        "probs_test": stored(pt),
        "pred_val": cv.astype(np.int16),
        "pred_test": ct.astype(np.int16),
        "labels_val": yv.astype(np.int16),
        "labels_test": yt.astype(np.int16),
        "digest_val": np.array(labels_digest(yv)),
        "digest_test": np.array(labels_digest(yt)),
        "logp_label_val": lv_label,
        "logp_label_test": lt_label,
        "logp_pred_val": lv_pred,
        "logp_pred_test": lt_pred,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
    os.replace(tmp, path)
    return path


def load(path) -> Predictions:
    """Read a file written by :func:`save`, never unpickling anything.

    Raises ValueError naming the file if it is not in this format (or format 2, without
    log-probabilities): not an npz, other keys, another format string, wrong dtypes or shapes, an
    object (pickled) array, or labels that do not match their stored digest.
    """
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a predictions file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path}: not a predictions file (not an .npz archive)")
    try:
        with z:
            keys = set(z.files)
            expected = _expected_keys(keys)
            if keys != expected:
                missing, extra = sorted(expected - keys), sorted(keys - expected)
                raise ValueError(f"unexpected keys (missing {missing}, extra {extra})")
            arrays = {k: z[k] for k in expected}  # an object array raises here, unread
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a predictions file ({e})") from None
    try:
        return _validate(arrays)
    except ValueError as e:
        raise ValueError(f"{path}: not a predictions file ({e})") from None


def _expected_keys(keys: set) -> frozenset | set:
    """The keys of the format a file's keys look like (its format string is checked after)."""
    return _KEYS[FORMAT] if {"logp_label_val", "logp_label_test"} & keys else _KEYS_WITHOUT_LOG_PROBS


def _text(a: np.ndarray, name: str) -> str:
    if a.dtype.kind != "U" or a.shape != ():
        raise ValueError(f"{name} must be a string scalar, got {a.dtype} {a.shape}")
    return str(a)


def _validate(a: dict) -> Predictions:
    fmt = _text(a["format"], "format")
    if _KEYS.get(fmt) != set(a):
        raise ValueError(f"format {fmt!r} with keys {sorted(a)}, expected {FORMAT!r}")
    nc = a["num_classes"]
    if nc.dtype != np.int64 or nc.shape != () or int(nc) < 1:
        raise ValueError(f"num_classes must be an int64 scalar >= 1, got {nc.dtype} {nc.shape}")
    out: dict[str, object] = {"num_classes": int(nc)}
    for s in SPLITS:
        p, y = a[f"probs_{s}"], a[f"labels_{s}"]
        if p.dtype != np.float16 or p.ndim != 2 or p.shape[1] != int(nc):
            raise ValueError(f"probs_{s} must be float16 (N, {int(nc)}), got {p.dtype} {p.shape}")
        if y.dtype != np.int16 or y.shape != (p.shape[0],):
            raise ValueError(f"labels_{s} must be int16 ({p.shape[0]},), got {y.dtype} {y.shape}")
        digest = _text(a[f"digest_{s}"], f"digest_{s}")
        if digest != labels_digest(y):
            raise ValueError(f"labels_{s} do not match their digest")
        c = a[f"pred_{s}"]
        if c.dtype != np.int16 or c.shape != y.shape or (len(c) and (c.min() < 0 or c.max() >= int(nc))):
            raise ValueError(
                f"pred_{s} must be int16 ({p.shape[0]},) classes in [0, {int(nc)}), got {c.dtype} {c.shape}"
            )
        out.update({f"probs_{s}": p, f"pred_{s}": c, f"labels_{s}": y, f"digest_{s}": digest})
        for k in ("label", "pred"):
            if f"logp_{k}_{s}" in a:
                lp = a[f"logp_{k}_{s}"]
                if lp.dtype != np.float32 or lp.shape != y.shape or np.isnan(lp).any() or (lp > 0).any():
                    raise ValueError(f"logp_{k}_{s} must be float32 ({p.shape[0]},) log-probabilities <= 0")
                out[f"logp_{k}_{s}"] = lp
    for arr in out.values():
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    return Predictions(**out)  # type: ignore[arg-type]  # each key checked above
