"""Thread settings beside busy processes: training images/s of cpu-converge's network
in a fresh process per setting for a few seconds (the OpenMP wait policy is read once, when torch loads),
next to ``busy`` processes that spin forever, as other users' jobs do on a shared machine.

    python benchmarks/threads_bench.py --busy 0,2,4,8 --reps 2     # a table and JSON

Run as ``threads_bench.py child SETTING``, it trains SECONDS and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (torch threads, "cores" = torch's default; OpenMP environment, {} = OpenMP's defaults)
SETTINGS = {
    "cores": ("cores", {}),  # torch's own default before kd-mlflow chose one
    "cores-passive": ("cores", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "spin-1k": ("cores", {"GOMP_SPINCOUNT": "1000"}),
    "spin-10k": ("cores", {"GOMP_SPINCOUNT": "10000"}),
    "spin-100k": ("cores", {"GOMP_SPINCOUNT": "100000"}),
    "one": ("1", {}),
    "default": ("cores", {}),  # as a training runs: kd_mlflow imported first (its policy)
}
SECONDS = 6.0  # timed training per sample (at least one step, after a warm-up step)
BATCH = int(os.environ.get("THREADS_BENCH_BATCH", "32"))  # images per step: seconds per sample beside busy processes
BF16 = os.environ.get("THREADS_BENCH_BF16") == "1"  # bf16 autocast and channels-last, as a CPU preset trains
TIMEOUT = 180  # seconds, start-up included: a setting that starves is recorded as 0 images/s


def child(setting: str) -> None:
    threads, _env = SETTINGS[setting]
    sys.path[:0] = [str(ROOT)]
    if setting == "default":  # as a training runs: kd_mlflow (its OpenMP policy) before torch
        import kd_mlflow  # noqa: F401
    import torch  # the other settings: torch's own OpenMP defaults
    import torch.nn.functional as F

    from kd_mlflow import models
    from kd_mlflow.config import PRESETS
    from kd_mlflow.train import make_optimizer

    if threads != "cores":
        torch.set_num_threads(int(threads))
    recipe = PRESETS["cpu-converge"].replace(batch_size=BATCH)
    torch.manual_seed(0)
    net = models.build(recipe, 10).net.train()
    opt = make_optimizer(recipe, net.parameters())
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    if BF16:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0, steps = time.perf_counter(), 0
    while steps == 0 or time.perf_counter() - t0 < SECONDS:
        step()
        steps += 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"images_per_second": steps * BATCH / seconds, "threads": torch.get_num_threads()}))


def sample(setting: str) -> dict:
    """One fresh process of ``setting``: its images/s (0 if it did not finish in TIMEOUT)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting][1])
    argv = [sys.executable, __file__, "child", setting]
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    except subprocess.TimeoutExpired:
        return {"images_per_second": 0.0, "threads": None, "timed_out": True}
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(loads: list[int], reps: int, settings=tuple(SETTINGS), log=print) -> dict:
    """Per number of busy processes: each setting's samples, interleaved (the order
    rotated each repetition), and the load average before the busy processes started."""
    out = {}
    for n in loads:
        spinners = busy(n)
        try:
            time.sleep(1 if n else 0)  # the spinners are running before the first sample
            rows: dict[str, list] = {s: [] for s in settings}
            load = os.getloadavg()[0]
            for rep in range(reps):
                order = list(settings)[rep % len(settings) :] + list(settings)[: rep % len(settings)]
                for s in order:
                    rows[s].append(sample(s))
            out[str(n)] = {"load_average_1min": load, "samples": rows, **summary(rows)}
            log(f"busy {n}: " + ", ".join(f"{s} {out[str(n)]['images_per_second'][s]:.0f}" for s in settings))
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    return out


def summary(rows: dict) -> dict:
    ips = {s: statistics.median(r["images_per_second"] for r in v) for s, v in rows.items()}
    one = ips.get("one") or float("nan")
    return {"images_per_second": ips, "over_one_thread": {s: v / one for s, v in ips.items()}}


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["child"]:
        child(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", default="0,2,4,8", help="numbers of busy processes, comma-separated")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    res = measure([int(n) for n in args.busy.split(",")], args.reps, tuple(args.settings.split(",")))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
