"""Why were cpu-demo student epochs slower than plain ones? One process, interleaved arms,
cpu-demo's network, whole training epochs through ``train.fit`` (tiny val/test):

    plain         CrossEntropy
    kd_alive      Distillation(CachedTeacher(table)), the five teacher models kept alive
    kd_freed      the same table, the teachers deleted and collected
    kd_objective  only the objective's own cost: kd_loss + the table lookup per batch,
                  on stored logits (no network), for one epoch's batches

    python benchmarks/kd_probe.py [--images 1024] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import harness  # noqa: E402
import run  # noqa: E402
import torch  # noqa: E402
import train_bench  # noqa: E402

from kd_mlflow.objectives import CachedTeacher, CrossEntropy, Distillation, teacher_table  # noqa: E402


def objective_seconds(b: train_bench.Bench, objective) -> float:
    """The objective alone over one epoch's batches, on fixed logits that need grad."""
    logits = torch.randn(b.recipe.batch_size, b.num_classes, requires_grad=True)
    order = torch.Generator().manual_seed(0)
    with harness.Timer(b.rt.device) as t:
        for batch in b.dd.train_batches(b.recipe.replace(augment=False), order):
            z = logits[: len(batch.y)]
            objective(z, batch).backward()
    return t.seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = run.Plan(
        "cpu-demo",
        n_train=args.images,
        n_eval=16,
        reps=args.reps,
        fit_epochs=1,
        tracking_epochs=1,
        threads=args.threads,
    )
    b = run.make_bench(plan, "cpu", 1)
    r = b.recipe
    teachers = train_bench.ensemble_teacher(b)
    table = teacher_table(teachers, b.dd, b.rt.autocast, r.eval_batch_size)
    kd = Distillation(CachedTeacher(table), r.temperature, r.alpha)
    arms = {"plain": lambda: train_bench.timed_fit(b, CrossEntropy()), "kd_alive": lambda: train_bench.timed_fit(b, kd)}
    s_alive = harness.interleave(arms, args.reps)
    del teachers, arms
    gc.collect()
    arms = {
        "plain": lambda: train_bench.timed_fit(b, CrossEntropy()),
        "kd_freed": lambda: train_bench.timed_fit(b, kd),
        "ce_objective": lambda: objective_seconds(b, CrossEntropy()),
        "kd_objective": lambda: objective_seconds(b, kd),
    }
    s_freed = harness.interleave(arms, args.reps)
    res = {
        "kd_alive_over_plain": harness.ratio_entry(s_alive, "kd_alive", "plain", b.images),
        "kd_freed_over_plain": harness.ratio_entry(s_freed, "kd_freed", "plain", b.images),
        "objective_seconds_per_epoch": {"ce": s_freed.median("ce_objective"), "kd": s_freed.median("kd_objective")},
        "table": {
            "shape": list(table.shape),
            "dtype": str(table.dtype),
            "contiguous": table.is_contiguous(),
            "requires_grad": table.requires_grad,
        },
        "threads": args.threads,
        "images": b.images,
    }
    for key in ("kd_alive_over_plain", "kd_freed_over_plain"):
        e = res[key]
        print(
            f"{key:<22} {e['ratio']:.3f}  per-rep {e['paired_ratio_median']:.3f} "
            f"[{e['paired_ratio_range'][0]:.3f}-{e['paired_ratio_range'][1]:.3f}]  "
            f"medians {e['median_seconds']}  foreign cpu {e['foreign_cpu_share_median']:.2f}"
        )
    print("objective alone per epoch (s):", res["objective_seconds_per_epoch"], res["table"])
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
