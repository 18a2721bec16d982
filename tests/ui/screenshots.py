"""Screenshots of MLflow's UI over a smoke study, in headless Chromium (issue 33): the
links `reproduce` prints, the Models tab, a train run's System metrics tab, the study's
artifacts. Not a test: look at the pictures.

    .venv/bin/python tests/ui/screenshots.py [OUT] [--chromium /usr/bin/chromium]

OUT (default /tmp/shots) keeps the server's store: a second call reuses the study (the
runs are FINISHED) and only takes the pictures again.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlflow_server import MlflowServer

STUDY = ("reproduce", "--preset", "smoke", "--seeds", "0-1", "--epochs", "4", "--log-checkpoints", "1")


def shoot(chromium: str, out: Path, name: str, url: str) -> None:
    """One page, once MLflow's JS app has drawn it: in virtual time, its requests and its
    lazily loaded charts are waited for (at 15 s the charts were still spinners)."""
    size, budget = "--window-size=1600,1000", "--virtual-time-budget=60000"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", size, budget]
    cmd.append("--run-all-compositor-stages-before-draw")
    subprocess.run([*cmd, f"--screenshot={out / name}.png", url], check=True, capture_output=True, timeout=180)
    print(f"{out / name}.png  {url}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="/tmp/shots")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(out / "server", port=5077).start()
    try:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": server.uri,
            "KD_MLFLOW_CACHE": str(out / "cache"),
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # a run of seconds draws a curve
        }
        proc = subprocess.run(
            [sys.executable, "-m", "kd_mlflow", *STUDY, "--experiment", "shots"],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        links = dict(re.findall(r"^(study|its runs side by side:|its runs by recipe.*?:) (\S+)$", proc.stderr, re.M))
        study, compare = links["study"], links["its runs side by side:"]
        view = next(v for k, v in links.items() if k.startswith("its runs by recipe"))
        base, exp = re.match(r"(.*)/#/experiments/(\d+)/", study).groups()
        parent = re.search(r"/runs/(\w+)", study).group(1)
        train = re.search(r"^run (\w+) \(train-seed-0\)", proc.stderr, re.M)
        train_id = train.group(1) if train else _train_run(server.uri, exp)
        shoot(args.chromium, out, "a-study-view", view)
        shoot(args.chromium, out, "b-compare", compare)
        ml = "workflowType=machine_learning"  # else MLflow 3's UI opens its GenAI pages
        shoot(args.chromium, out, "c-models", f"{base}/#/experiments/{exp}/models?{ml}")
        shoot(args.chromium, out, "d-system-metrics", f"{base}/#/experiments/{exp}/runs/{train_id}/system-metrics?{ml}")
        shoot(args.chromium, out, "e-study-artifacts", f"{base}/#/experiments/{exp}/runs/{parent}/artifacts?{ml}")
    finally:
        server.stop()


def _train_run(uri: str, experiment_id: str) -> str:
    """A train run of the study (a rerun reuses them and prints no run lines)."""
    import mlflow

    (run,) = mlflow.MlflowClient(uri).search_runs([experiment_id], "tags.`kd.role` = 'train' AND tags.`kd.seed` = '0'")
    return run.info.run_id


if __name__ == "__main__":
    main()
