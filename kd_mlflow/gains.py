"""Every gain of a group's tables with its uncertainty, and the mechanism behind it,
computed from the runs' logged test-set predictions (pure: numpy and pandas, no MLflow,
no torch).

Gains (test accuracy, percentage points), each with a 95% interval (10,000 resamples,
seed 0: the same runs give the same interval): the ensemble minus the mean single model,
each KD student minus the mean single model and, of several, their mean (with a
t-interval over the KD seeds as well), each SD student minus its teacher (with the exact
McNemar p-value) and their mean (with a t-interval over the pairs as well), the SD
ensemble minus the ensemble. The single models get a t-interval over seeds.

Which interval (the table's ``interval`` column): a gain between two GROUPS of runs
(several runs on each side: the SD students and their teachers, paired; several KD
students and the single models) resamples seeds, then test images
(:func:`kd_mlflow.stats.hierarchical_bootstrap`, "seeds × images"): both sides vary
with their seed. A side of one run (an ensemble, one KD student) holds that run fixed:
the paired bootstrap over test images ("images"), the test set's sampling error alone.

Each estimate is computed once, from the runs' logged accuracies (:func:`estimates`),
for this table and for the summary alike; the intervals come from the predictions'
stored classes, whose accuracy is the logged one.

Mechanism: how much the members disagree; how closely each student follows its
teacher (top-1 agreement, mean KL(teacher || student)); how much of the ensemble's gain
the KD student keeps; and, of the images the ensemble gets right and most members get
wrong, the share the KD student gets right.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import schema, stats
from . import tables as tables_mod

GAIN_COLUMNS = tables_mod.GAINS.names
MECHANISM_COLUMNS = tables_mod.MECHANISM.names


# The tables whose rows have gains, in their StudyTables names.
ESTIMATED = ("seeds", "ensembles", "kd", "self_distillation", "sd_ensembles", "joint", "alone")
ESTIMATE_COLUMNS = ["kind", "gain", "estimate", "n", "run_id", "run_ids", "over_run_ids"]


KD_MEAN = "KD - mean single (mean over KD seeds)"
ALONE = "student's network alone"  # a KD student's architecture trained without KD (its summary row)
KD_OVER_ALONE = f"KD - {ALONE}"  # what distillation did, the network held fixed
IMAGES, SEEDS_AND_IMAGES = "images", "seeds × images"  # the interval column's values


def seeds_of(members) -> str:
    """ "0,1,2,3,4" -> "seeds 0-4": what names a run made of members."""
    return "seeds " + schema.seed_label(str(members).split(",")) if isinstance(members, str) and members else "no seeds"


def joint_entries(joint: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The joint runs by their members: one entry per size and member seeds, never a mean
    across them (a 5-network and a 3-network model are different models). Title ->
    its runs; the title names the seeds only when there are several entries."""
    keys = joint["members"].fillna("").astype(str)
    several = keys.nunique() > 1
    return {
        ("training the average" + (f" ({seeds_of(k)})" if several else "")): joint[keys == k]
        for k in sorted(keys.unique(), key=lambda k: (len(k.split(",")), k))
    }


def same_seeds(seeds: pd.DataFrame, members) -> pd.DataFrame:
    """The single models of a joint run's seeds where all of them are here, else all the
    single models (the gain is then over the mean single, as for an ensemble)."""
    want = {s for s in str(members or "").split(",") if s}
    mine = seeds[seeds["seed"].astype(str).isin(want)]
    return mine if want and set(mine["seed"].astype(str)) == want else seeds


def estimates(seeds, ensembles, kd, self_distillation, sd_ensembles, joint=None, alone=None) -> pd.DataFrame:
    """Every gain of one group from its runs' logged test accuracies (points): the
    estimates of the gains table, and (their means per ``kind``) the summary's gains,
    so that the two are one number. One row per gain: ``run_ids`` minus ``over_run_ids``
    (each side the mean of its runs), ``run_id`` the run it describes. The inputs are the
    rows a summary counts (:func:`counted`). Where several runs fill a
    role, each row names its run (seed or members), so no label repeats."""
    singles = list(seeds["run_id"])
    single = seeds["test_acc"].mean()
    rows = []
    several_ens, several_kd = len(ensembles) > 1, len(kd) > 1
    for r in ensembles.itertuples():
        name = f"ensemble ({seeds_of(r.members)})" if several_ens else "ensemble"
        rows.append(
            ("ensemble", f"{name} - mean single", r.test_acc - single, len(singles), r.run_id, [r.run_id], singles)
        )
    for r in kd.itertuples():
        name = f"KD student {_seed(r.seed)}" if several_kd else "KD"
        rows.append(("kd", f"{name} - mean single", r.test_acc - single, len(singles), r.run_id, [r.run_id], singles))
    if several_kd:
        rows.append(("kd_mean", KD_MEAN, kd["test_acc"].mean() - single, len(kd), None, list(kd["run_id"]), singles))
    sd = self_distillation
    for r in sd.itertuples():
        name = f"SD student {r.student_seed} - teacher {r.teacher_seed}"
        rows.append(("sd", name, r.gain, 1, r.run_id, [r.run_id], [r.teacher_run_id]))
    if len(sd):
        name = "SD - teacher (mean over pairs)"
        rows.append(("sd_mean", name, sd["gain"].mean(), len(sd), None, list(sd["run_id"]), list(sd["teacher_run_id"])))
    for r in sd_ensembles.itertuples():
        for e in ensembles.itertuples():
            left = f"SD ensemble ({seeds_of(r.members)})" if len(sd_ensembles) > 1 else "SD ensemble"
            right = f"ensemble ({seeds_of(e.members)})" if several_ens else "ensemble"
            rows.append(
                ("sd_ensemble", f"{left} - {right}", r.test_acc - e.test_acc, 1, r.run_id, [r.run_id], [e.run_id])
            )
    if joint is not None:
        rows += _joint_estimates(seeds, joint)
    if alone is not None and len(alone):
        rows += _alone_estimates(seeds, kd, alone)
    return _unique(pd.DataFrame(rows, columns=ESTIMATE_COLUMNS))


def _alone_estimates(seeds: pd.DataFrame, kd: pd.DataFrame, alone: pd.DataFrame) -> list[tuple]:
    """The KD students' network alone minus the mean single model (what the smaller
    network costs without KD), and the KD students minus it (what KD did)."""
    on_own, ids = alone["test_acc"].mean(), list(alone["run_id"])
    rows = [
        (
            "alone",
            f"{ALONE} - mean single",
            on_own - seeds["test_acc"].mean(),
            len(alone),
            None,
            ids,
            list(seeds["run_id"]),
        )
    ]
    if len(kd):
        rows.append(("kd_alone", KD_OVER_ALONE, kd["test_acc"].mean() - on_own, len(kd), None, list(kd["run_id"]), ids))
    return rows


def _seed(seed) -> str:
    return "-" if seed is None or pd.isna(seed) else str(int(seed))


def _joint_estimates(seeds: pd.DataFrame, joint: pd.DataFrame) -> list[tuple]:
    """Each joint run minus the mean of the single models of its own seeds (kind
    ``joint:<title>``: the summary's entry of its size)."""
    rows = []
    for title, runs in joint_entries(joint).items():
        for r in runs.itertuples():
            over = same_seeds(seeds, r.members)
            what = "mean single" if len(over) == len(seeds) else f"mean single of {seeds_of(r.members)}"
            acc = r.test_acc - over["test_acc"].mean()
            rows.append(
                (f"joint:{title}", f"{title} - {what}", acc, len(over), r.run_id, [r.run_id], list(over["run_id"]))
            )
    return rows


def _unique(est: pd.DataFrame) -> pd.DataFrame:
    """A label that still repeats (two runs of one seed, e.g. duplicates of different
    teachers) gets its run id: every row of the gains table names what it is."""
    repeated = est["gain"].duplicated(keep=False)
    tagged = [
        f"{g} [run {r}]" if rep and r else g for g, r, rep in zip(est["gain"], est["run_id"], repeated, strict=True)
    ]
    return est.assign(gain=tagged)


def counted(tables: dict, run_ids: set) -> dict:
    """The rows a summary counts: ``run_ids`` (the runs of the table's own line), and of
    the SD students those whose teacher's result is known."""
    out = {k: tables[k][tables[k]["run_id"].isin(run_ids)] for k in ESTIMATED}
    sd = out["self_distillation"]
    out["self_distillation"] = sd[sd["teacher_test_acc"].notna()]
    return out


def _counted(tables) -> dict:
    """The rows the group's summary counts (its run ids), per table."""
    ids = {rid for run_ids in tables.summary["run_ids"] for rid in run_ids}
    return counted({k: getattr(tables, k) for k in ESTIMATED}, ids)


def usable(tables, preds: dict, run_ids) -> tuple[dict, list[str]]:
    """The predictions of ``run_ids`` whose test accuracy is their run's logged one, and
    notes on those left out (see :func:`_usable`)."""
    return _usable(preds, run_ids, tables_mod.logged(tables))


def _usable(preds: dict, run_ids, logged: dict) -> tuple[dict, list[str]]:
    """The predictions whose test accuracy is their run's logged one; the others are
    left out with a note (an interval around another number is not this gain's), as is
    a run whose predictions are missing."""
    out, notes = {}, []
    for rid in dict.fromkeys(run_ids):
        p = preds.get(rid)
        if p is None:
            continue
        right, n = int(p.correct("test").sum()), len(p.labels("test"))
        acc = logged.get(rid)
        if acc is not None and not math.isnan(acc) and abs(acc * n / 100 - right) > 1e-6:
            notes.append(
                f"run {rid}: its predictions give {100 * right / n:.2f}% test accuracy, its logged "
                f"final_test_acc is {acc:.2f}%: left out of the intervals"
            )
            continue
        out[rid] = p
    return out, notes


def _correct(preds: dict, run_ids) -> np.ndarray | None:
    """(k, N) booleans for these runs, or None if any run's predictions are missing."""
    rows = [preds.get(r) for r in run_ids]
    if not rows or any(p is None for p in rows):
        return None
    return np.stack([p.correct("test") for p in rows if p is not None])


def _same_images(preds: dict, run_ids) -> bool:
    digests = {preds[r].digest("test") for r in run_ids if preds.get(r) is not None}
    return len(digests) <= 1


def interval(a: np.ndarray, b: np.ndarray, paired: bool, n_resamples: int, seed: int):
    """(the 95% interval of b's mean correctness minus a's, points; which it is): over
    seeds and images where both sides are groups of runs, ``paired`` where row j of a
    goes with row j of b; else over images, the one run fixed (see the module's text)."""
    if len(a) >= 2 and len(b) >= 2:
        return (
            stats.hierarchical_bootstrap(a, b, paired=paired, scale=100.0, n_resamples=n_resamples, seed=seed),
            SEEDS_AND_IMAGES,
        )
    return stats.paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed), IMAGES


def _row(r: dict, interval, how: str, seed=None, mcnemar=None) -> dict:
    return {
        "gain": r["gain"],
        "estimate": r["estimate"],
        "lo": interval.lo,
        "hi": interval.hi,
        "interval": how,
        "seed_lo": seed.lo if seed else math.nan,
        "seed_hi": seed.hi if seed else math.nan,
        "n": r["n"],
        "p_value": mcnemar.p_value if mcnemar else math.nan,
        "b": mcnemar.b if mcnemar else None,
        "c": mcnemar.c if mcnemar else None,
        "run_id": r["run_id"],
        "over_run_ids": list(r["over_run_ids"]),
    }


def compute(tables, preds: dict, n_resamples: int = 10_000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(gains, mechanism, notes) for one group's tables (``compare.StudyTables``);
    ``preds``: run id -> ``predictions.Predictions``. Each gain's estimate is the one
    :func:`estimates` gives (the summary's); its interval is from the predictions."""
    est = estimates(**_counted(tables))
    singles = list(tables.seeds["run_id"])
    ids = tables_mod.run_ids([tables])
    missing = sorted({r for r in ids if preds.get(r) is None})
    notes = []
    if missing:
        notes.append(
            f"no predictions for {len(missing)} run(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): their gains have no interval"
        )
    preds, usable_notes = usable(tables, preds, ids)
    notes += usable_notes
    if not _same_images(preds, ids):
        notes.append("the runs' predictions are not on the same test images (labels digests differ): no intervals")
        return pd.DataFrame(columns=GAIN_COLUMNS), pd.DataFrame(columns=MECHANISM_COLUMNS), notes

    # the per-run gains a mean row's t-interval is over: SD pairs, KD seeds
    per_run = {"sd_mean": est.loc[est["kind"] == "sd", "estimate"], "kd_mean": est.loc[est["kind"] == "kd", "estimate"]}
    gains = []
    for r in est.to_dict("records"):
        a, b = _correct(preds, r["over_run_ids"]), _correct(preds, r["run_ids"])
        if a is None or b is None:
            continue
        mcnemar = stats.mcnemar_exact(a[0], b[0]) if r["kind"] == "sd" else None
        over = per_run.get(r["kind"])
        over_seeds = stats.seed_interval(over.to_numpy()) if over is not None and len(over) >= 2 else None
        boot, how = interval(a, b, r["kind"] == "sd_mean", n_resamples, seed)
        gains.append(_row(r, boot, how, over_seeds, mcnemar))
    mech = _mechanism(tables, preds, est, _correct(preds, singles), singles, n_resamples, seed)
    return pd.DataFrame(gains, columns=GAIN_COLUMNS), pd.DataFrame(mech, columns=MECHANISM_COLUMNS), notes


def _figure(figure: str, value, n, detail="", run_id=None, lo=math.nan, hi=math.nan) -> dict:
    return {"figure": figure, "value": value, "lo": lo, "hi": hi, "n": n, "detail": detail, "run_id": run_id}


def _mechanism(tables, preds, est, c_single, singles, n_resamples, seed) -> list[dict]:
    out = []
    if singles and tables.seeds["test_acc"].notna().sum() >= 2:
        si = stats.seed_interval(tables.seeds["test_acc"].dropna().to_numpy())
        out.append(_figure("single models: test accuracy over seeds (t)", si.mean, si.n, lo=si.lo, hi=si.hi))
    if len(singles) >= 2 and all(preds.get(r) is not None for r in singles):
        d = stats.disagreement(np.stack([preds[r].top1("test") for r in singles]))
        out.append(
            _figure(
                "members: images where they do not all agree", 100 * d.not_unanimous, d.n_members, "% of test images"
            )
        )
        out.append(_figure("members: mean pairwise disagreement", 100 * d.pairwise, d.n_members, "% of test images"))
    follows = [(r.run_id, r.teacher_run_id, f"KD student {r.seed}") for r in tables.kd.itertuples()]
    follows += [
        (r.run_id, r.teacher_run_id, f"SD student {r.student_seed} of teacher {_seed(r.teacher_seed)}")
        for r in tables.self_distillation.itertuples()
    ]
    for student, teacher, label in follows:
        if preds.get(student) is None or preds.get(teacher) is None:
            continue
        t, s = preds[teacher], preds[student]
        top1 = float((t.top1("test") == s.top1("test")).mean())  # the classes, not the float16 argmax
        kl = stats.agreement(t.probs("test"), s.probs("test")).kl
        n = len(t.labels("test"))
        out.append(_figure(f"{label}: top-1 agreement with its teacher", 100 * top1, n, "% of test images", student))
        out.append(_figure(f"{label}: mean KL(teacher || student)", kl, n, "nats", student))
    if c_single is not None:
        out += _kept_by_kd(tables, preds, est, c_single, n_resamples, seed)
    return _unique_figures(out)


def _unique_figures(rows: list[dict]) -> list[dict]:
    """A figure's label that still repeats (two KD students of one seed, of two
    ensembles) gets its run id, as a gain's does."""
    seen = [r["figure"] for r in rows]
    return [{**r, "figure": f"{r['figure']} [run {r['run_id']}]"} if seen.count(r["figure"]) > 1 else r for r in rows]


def _kept_by_kd(tables, preds, est, c_single, n_resamples, seed) -> list[dict]:
    """How much of each ensemble's gain each KD student keeps: the ratio of their gains
    (the estimates), its interval over resampled images; and the rescued images."""
    gain = {(r.kind, r.run_id): r.estimate for r in est.itertuples()}
    out = []
    several = len(tables.ensembles) > 1  # then each figure names the ensemble it is of
    for e in tables.ensembles.itertuples():
        of = f" (ensemble of {seeds_of(e.members)})" if several else ""
        c_e = _correct(preds, [e.run_id])
        for k in tables.kd.itertuples():
            c_kd = _correct(preds, [k.run_id])
            if c_e is None or c_kd is None or ("ensemble", e.run_id) not in gain or ("kd", k.run_id) not in gain:
                continue
            ret = stats.retention(c_single, c_e[0], c_kd[0], n_resamples=n_resamples, seed=seed)
            ratio = gain[("kd", k.run_id)] / gain[("ensemble", e.run_id)] if gain[("ensemble", e.run_id)] else math.nan
            out.append(
                _figure(
                    f"KD student {k.seed}{of}: share of the ensemble's gain it keeps",
                    ratio,
                    len(c_single),
                    "(KD - mean single) / (ensemble - mean single)",
                    k.run_id,
                    ret.lo,
                    ret.hi,
                )
            )
            res = stats.rescued_share(c_single, c_e[0], c_kd[0])
            detail = (
                f"% of {res.n_images} images (members there: {100 * res.member_share:.1f}%)"
                if res.n_images
                else "no such image"
            )
            value = 100 * res.share if res.n_images else math.nan
            out.append(
                _figure(
                    f"KD student {k.seed}{of}: right on images the ensemble rescues",
                    value,
                    res.n_images,
                    detail,
                    k.run_id,
                )
            )
    return out
