"""Every gain of a group's tables with its uncertainty, and the mechanism behind it,
computed from the runs' logged test-set predictions (pure: numpy and pandas, no MLflow,
no torch).

Gains (test accuracy, percentage points), each with a 95% paired-bootstrap interval
over test images (10,000 resamples, seed 0: the same runs give the same interval):
the ensemble minus the mean single model, the KD student minus the mean single model,
each SD student minus its teacher (with the exact McNemar p-value) and their mean (with
a t-interval over the pairs as well), the SD ensemble minus the ensemble. The single
models get a t-interval over seeds.

Mechanism: how much the members disagree; how closely each student follows its
teacher (top-1 agreement, mean KL(teacher || student)); how much of the ensemble's gain
the KD student keeps; and, of the images the ensemble gets right and most members get
wrong, the share the KD student gets right.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import stats

GAIN_COLUMNS = [
    "gain",
    "estimate",
    "lo",
    "hi",
    "seed_lo",
    "seed_hi",
    "n",
    "p_value",
    "b",
    "c",
    "run_id",
    "over_run_ids",
]
MECHANISM_COLUMNS = ["figure", "value", "lo", "hi", "n", "detail", "run_id"]


def _correct(preds: dict, run_ids) -> np.ndarray | None:
    """(k, N) booleans for these runs, or None if any run's predictions are missing."""
    rows = [preds.get(r) for r in run_ids]
    if not rows or any(p is None for p in rows):
        return None
    return np.stack([p.correct("test") for p in rows])


def _same_images(preds: dict, run_ids) -> bool:
    digests = {preds[r].digest("test") for r in run_ids if preds.get(r) is not None}
    return len(digests) <= 1


def _row(gain: str, interval, run_id=None, over=(), seed=None, mcnemar=None, n=None) -> dict:
    return {
        "gain": gain,
        "estimate": interval.estimate,
        "lo": interval.lo,
        "hi": interval.hi,
        "seed_lo": seed.lo if seed else math.nan,
        "seed_hi": seed.hi if seed else math.nan,
        "n": n if n is not None else 1,
        "p_value": mcnemar.p_value if mcnemar else math.nan,
        "b": mcnemar.b if mcnemar else None,
        "c": mcnemar.c if mcnemar else None,
        "run_id": run_id,
        "over_run_ids": list(over),
    }


def compute(tables, preds: dict, n_resamples: int = 10_000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(gains, mechanism, notes) for one group's tables (``compare.StudyTables``);
    ``preds``: run id -> ``predictions.Predictions``."""
    gains, mech, notes = [], [], []
    singles = list(tables.seeds["run_id"])
    ids = (
        singles
        + list(tables.ensembles["run_id"])
        + list(tables.kd["run_id"])
        + list(tables.self_distillation["run_id"])
        + list(tables.self_distillation["teacher_run_id"].dropna())
        + list(tables.sd_ensembles["run_id"])
    )
    missing = sorted({r for r in ids if preds.get(r) is None})
    if missing:
        notes.append(
            f"no predictions for {len(missing)} run(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): their gains have no interval"
        )
    if not _same_images(preds, ids):
        notes.append("the runs' predictions are not on the same test images (labels digests differ): no intervals")
        return pd.DataFrame(columns=GAIN_COLUMNS), pd.DataFrame(columns=MECHANISM_COLUMNS), notes

    def boot(a, b):
        return stats.paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)

    c_single = _correct(preds, singles)
    if singles and tables.seeds["test_acc"].notna().sum() >= 2:
        si = stats.seed_interval(tables.seeds["test_acc"].dropna().to_numpy())
        mech.append(
            {
                "figure": "single models: test accuracy over seeds (t)",
                "value": si.mean,
                "lo": si.lo,
                "hi": si.hi,
                "n": si.n,
                "detail": "",
                "run_id": None,
            }
        )
    for r in tables.ensembles.itertuples():
        c_ens = _correct(preds, [r.run_id])
        if c_single is not None and c_ens is not None:
            gains.append(_row("ensemble - mean single", boot(c_single, c_ens), r.run_id, singles, n=len(singles)))
    for r in tables.kd.itertuples():
        c_kd = _correct(preds, [r.run_id])
        if c_single is not None and c_kd is not None:
            gains.append(_row("KD - mean single", boot(c_single, c_kd), r.run_id, singles, n=len(singles)))
    pairs = tables.self_distillation[tables.self_distillation["teacher_test_acc"].notna()]
    pair_gains = []
    for r in pairs.itertuples():
        c_t, c_s = _correct(preds, [r.teacher_run_id]), _correct(preds, [r.run_id])
        if c_t is None or c_s is None:
            continue
        interval = boot(c_t, c_s)
        pair_gains.append(interval.estimate)
        gains.append(
            _row(
                f"SD student {r.student_seed} - teacher {r.teacher_seed}",
                interval,
                r.run_id,
                [r.teacher_run_id],
                mcnemar=stats.mcnemar_exact(c_t[0], c_s[0]),
            )
        )
    if len(pair_gains) == len(pairs) and len(pairs) >= 1:
        c_t = _correct(preds, list(pairs["teacher_run_id"]))
        c_s = _correct(preds, list(pairs["run_id"]))
        seed_iv = stats.seed_interval(pair_gains) if len(pair_gains) >= 2 else None
        gains.append(
            _row(
                "SD - teacher (mean over pairs)",
                boot(c_t, c_s),
                None,
                list(pairs["teacher_run_id"]),
                seed=seed_iv,
                n=len(pairs),
            )
        )
    for r in tables.sd_ensembles.itertuples():
        for e in tables.ensembles.itertuples():
            c_sde, c_e = _correct(preds, [r.run_id]), _correct(preds, [e.run_id])
            if c_sde is not None and c_e is not None:
                gains.append(_row("SD ensemble - ensemble", boot(c_e, c_sde), r.run_id, [e.run_id]))
    mech += _mechanism(tables, preds, c_single, singles, n_resamples, seed)
    return pd.DataFrame(gains, columns=GAIN_COLUMNS), pd.DataFrame(mech, columns=MECHANISM_COLUMNS), notes


def _mechanism(tables, preds, c_single, singles, n_resamples, seed) -> list[dict]:
    out = []
    if len(singles) >= 2 and all(preds.get(r) is not None for r in singles):
        d = stats.disagreement(np.stack([preds[r].top1("test") for r in singles]))
        out.append(
            {
                "figure": "members: images where they do not all agree",
                "value": 100 * d.not_unanimous,
                "lo": math.nan,
                "hi": math.nan,
                "n": d.n_members,
                "detail": "% of test images",
                "run_id": None,
            }
        )
        out.append(
            {
                "figure": "members: mean pairwise disagreement",
                "value": 100 * d.pairwise,
                "lo": math.nan,
                "hi": math.nan,
                "n": d.n_members,
                "detail": "% of test images",
                "run_id": None,
            }
        )
    follows = [(r.run_id, r.teacher_run_id, f"KD student {r.seed}") for r in tables.kd.itertuples()]
    follows += [
        (r.run_id, r.teacher_run_id, f"SD student {r.student_seed}") for r in tables.self_distillation.itertuples()
    ]
    for student, teacher, label in follows:
        if preds.get(student) is None or preds.get(teacher) is None:
            continue
        a = stats.agreement(preds[teacher].probs("test"), preds[student].probs("test"))
        out.append(
            {
                "figure": f"{label}: top-1 agreement with its teacher",
                "value": 100 * a.top1,
                "lo": math.nan,
                "hi": math.nan,
                "n": a.n_images,
                "detail": "% of test images",
                "run_id": student,
            }
        )
        out.append(
            {
                "figure": f"{label}: mean KL(teacher || student)",
                "value": a.kl,
                "lo": math.nan,
                "hi": math.nan,
                "n": a.n_images,
                "detail": "nats",
                "run_id": student,
            }
        )
    if c_single is not None:
        for e in tables.ensembles.itertuples():
            c_e = _correct(preds, [e.run_id])
            for k in tables.kd.itertuples():
                c_kd = _correct(preds, [k.run_id])
                if c_e is None or c_kd is None:
                    continue
                ret = stats.retention(c_single, c_e[0], c_kd[0], n_resamples=n_resamples, seed=seed)
                out.append(
                    {
                        "figure": f"KD student {k.seed}: share of the ensemble's gain it keeps",
                        "value": ret.estimate,
                        "lo": ret.lo,
                        "hi": ret.hi,
                        "n": len(singles),
                        "detail": "(KD - mean single) / (ensemble - mean single)",
                        "run_id": k.run_id,
                    }
                )
                res = stats.rescued_share(c_single, c_e[0], c_kd[0])
                out.append(
                    {
                        "figure": f"KD student {k.seed}: right on images the ensemble rescues",
                        "value": 100 * res.share if res.n_images else math.nan,
                        "lo": math.nan,
                        "hi": math.nan,
                        "n": res.n_images,
                        "detail": f"% of {res.n_images} images (members there: {100 * res.member_share:.1f}%)"
                        if res.n_images
                        else "no such image",
                        "run_id": k.run_id,
                    }
                )
    return out
