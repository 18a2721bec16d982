"""A Ray study beside a CPU hog, against the same study as local processes (--jobs 2)
beside the same hog: the wall-time ratio, and the niceness every training ran at.

    python benchmarks/ray_priority.py [--seeds 0-1] [--json PATH]

Before kd-mlflow kept its trainings at the launching command's priority, Ray ran them at
nice 15 (its workers' default), and beside two busy loops at nice 0 a smoke study made
no progress for 20 minutes. The hog is two busy processes at this script's niceness,
stopped when the study ends (and after 15 minutes at most). Each arm runs in an
experiment of its own on a local sqlite store, with a fresh cache, so nothing is reused.
Nothing here asserts a speed: the figure is printed for the reader (target: <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOG_SECONDS = 900


def _spin(deadline: float) -> None:
    while time.time() < deadline:
        pass


def _study(root: Path, name: str, seeds: str, *extra: str) -> tuple[float, list[str]]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "KD_MLFLOW_CACHE": str(root / f"cache-{name}"),
    }
    env.pop("MLFLOW_RUN_ID", None)
    argv = [sys.executable, "-m", "kd_mlflow", "reproduce", "--preset", "smoke", "--seeds", seeds]
    argv += ["--experiment", name, "--no-register", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, _niceness(env, name)


def _niceness(env: dict, experiment: str) -> list[str]:
    """The kd.env.nice tag of every training run of the experiment."""
    code = (
        "import mlflow, sys; c = mlflow.MlflowClient(); e = c.get_experiment_by_name(sys.argv[1]);"
        "print(','.join(r.data.tags.get('kd.env.nice', '?') for r in c.search_runs([e.experiment_id])"
        " if r.data.tags.get('kd.role') in ('train', 'student')))"
    )
    out = subprocess.run([sys.executable, "-c", code, experiment], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(",")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-1")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kd-ray-priority-"))
    hogs = [multiprocessing.Process(target=_spin, args=(time.time() + HOG_SECONDS,)) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        local, local_nice = _study(root, "jobs2", args.seeds, "--jobs", "2")
        ray, ray_nice = _study(root, "ray", args.seeds, "--executor", "ray")
    finally:
        for h in hogs:
            h.terminate()
    result = {
        "ray_seconds": ray,
        "jobs2_seconds": local,
        "ray_over_jobs2": ray / local,
        "ray_trainings_nice": ray_nice,
        "jobs2_trainings_nice": local_nice,
        "this_process_nice": os.nice(0),
        "hog_processes": len(hogs),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
    }
    print(f"smoke study, seeds {args.seeds}, beside {len(hogs)} busy loops at nice {os.nice(0)}:")
    print(f"  --jobs 2        {local:7.1f} s   trainings at nice {sorted(set(local_nice))}")
    print(f"  --executor ray  {ray:7.1f} s   trainings at nice {sorted(set(ray_nice))}")
    print(f"  ray / jobs 2    {ray / local:7.2f}     (target <= 1.3)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
