"""The cost of MLflow's system metrics on a training run: the same tracked training (a
real run on a real `mlflow server`, its epochs through EpochSink) with the monitor off
and on, interleaved, as a ratio of median seconds.

    python benchmarks/system_metrics_bench.py --interval 1 --reps 5

``--interval`` is the sampling interval in seconds (kd-mlflow's default is
tracking.SYSTEM_METRICS_INTERVAL); a short one bounds the cost of the default from
above. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness
import run as bench_run
import train_bench

from kd_mlflow import tracking
from kd_mlflow.objectives import CrossEntropy
from kd_mlflow.runs import EpochSink


def tracked_fit(b: train_bench.Bench, session, monitor: bool) -> float:
    """Seconds of one tracked training; the run is opened and ended outside the timer,
    the monitor (when on) samples the machine all through it."""
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true" if monitor else "false"
    writer = tracking.RunWriter(session, None, f"bench-system-metrics-{'on' if monitor else 'off'}")
    try:
        return train_bench.timed_fit(b, CrossEntropy(), EpochSink(writer))
    finally:
        writer.end("FINISHED")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=tracking.SYSTEM_METRICS_INTERVAL, help="seconds per sample")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", type=int, default=2048, help="training images per epoch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="smoke", help="the recipe (network, batch size) trained")
    args = ap.parse_args(argv)
    from tests.mlflow_server import MlflowServer

    tracking.SYSTEM_METRICS_INTERVAL = args.interval
    plan = bench_run.make_plan(True, args.device)
    plan = dataclasses.replace(plan, n_train=args.train, preset=args.preset)
    b = bench_run.make_bench(plan, args.device, args.epochs)
    with tempfile.TemporaryDirectory(prefix="kd-bench-sysm-") as tmp, MlflowServer(Path(tmp) / "store") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        session = tracking.connect("bench-system-metrics")
        arms = {"on": lambda: tracked_fit(b, session, True), "off": lambda: tracked_fit(b, session, False)}
        s = harness.interleave(arms, args.reps)
    entry = harness.ratio_entry(s, "on", "off", b.images)
    per_epoch = {arm: seconds / args.epochs for arm, seconds in entry["median_seconds"].items()}
    out = {
        "preset": args.preset,
        "interval_s": args.interval,
        "epochs": args.epochs,
        "epoch_seconds": per_epoch,
        **entry,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
