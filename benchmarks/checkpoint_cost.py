"""What a checkpoint that travels with its run costs per upload: its size, and the seconds
to put it on a real `mlflow server` (sqlite, proxied artifacts, loopback) and to fetch it
back, for the networks of the smoke, cpu-converge and seed-report presets.

    .venv/bin/python benchmarks/checkpoint_cost.py [--presets smoke,cpu-converge] [--repeats 3]

The checkpoint is the one the loop writes (``train._snapshot``): weights, the optimiser's
state after one step (Adam: two moments per parameter), the schedule, the generators, and
the selected weights (one more copy of the network). Loopback measures the server's and
the client's own cost; a real link adds size / bandwidth (printed for 100 MB/s and 10 MB/s).

Beside it, what one ``--log-checkpoints`` checkpoint costs: the network as a LoggedModel
(torch.export's pt2 model, its signature and input example) and the seconds the training
loop pauses to log it with its metrics (``RunWriter.log_checkpoint``, as
``runs.CheckpointSink`` calls it: export, files, a few requests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mlflow_server import MlflowServer

from kd_mlflow import config, models, tracking
from kd_mlflow.checkpoint import dump, write_atomic
from kd_mlflow.models import cpu_copy
from kd_mlflow.train import _snapshot, make_optimizer, make_runtime, make_scheduler

CLASSES = {"smoke": 10, "cpu-converge": 10, "seed-report": 10}  # digits, a folder of 10, CIFAR-10


def checkpoint_bytes(preset: str) -> tuple[int, bytes]:
    """(parameters, the checkpoint's bytes) after one optimiser step on random images."""
    recipe = config.PRESETS[preset]
    torch.manual_seed(0)
    net = models.build(recipe, CLASSES[preset])
    opt = make_optimizer(recipe, net.parameters())
    sched = make_scheduler(recipe, opt, 10)
    x = torch.randn(2, 3, 32, 32)
    net(x).sum().backward()
    opt.step()
    sched.step()
    selected = {"best_epoch": 1, "best_val_acc": 1.0, "best_test_acc": 1.0, "history": [{"val_acc": 1.0}]}
    networks = [{**selected, "best_state": cpu_copy(net.state_dict())}]
    rt = make_runtime(recipe, "cpu")
    state = _snapshot(net, opt, sched, torch.Generator().manual_seed(0), 1, networks, rt)
    return sum(p.numel() for p in net.parameters()), dump({**state, "run_ids": {"h": "r"}})


def logged_checkpoint(session, preset: str, repeats: int) -> tuple[int, list[float]]:
    """(the LoggedModel's bytes, the seconds of each of ``repeats`` checkpoints)."""
    recipe = config.PRESETS[preset]
    torch.manual_seed(0)
    net = models.build(recipe, CLASSES[preset]).eval()
    example = torch.randint(0, 256, (2, 3, recipe.image_size, recipe.image_size), dtype=torch.uint8)
    writer = tracking.RunWriter(session, None, f"{preset}-logged")
    seconds, model_id = [], ""
    for epoch in range(1, repeats + 1):
        t0 = time.perf_counter()
        model_id = writer.log_checkpoint(net, example, epoch, {"val_acc": 50.0}, int(1000 * time.time()))
        seconds.append(time.perf_counter() - t0)
    writer.end()
    size, folders = 0, [None]
    while folders:  # its files, folders walked
        for f in session.client.list_logged_model_artifacts(model_id, folders.pop()):
            if f.is_dir:
                folders.append(f.path)
            else:
                size += f.file_size or 0
    return size, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="smoke,cpu-converge,seed-report")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server").start()
        try:
            import mlflow

            mlflow.set_tracking_uri(server.uri)
            session = tracking.connect("checkpoint-cost")
            remote = tracking.ServerCheckpoints(session)
            for preset in args.presets.split(","):
                params, data = checkpoint_bytes(preset)
                path = Path(tmp) / f"{preset}.ckpt"
                write_atomic(path, data)
                run_id = session.client.create_run(session.experiment_id, run_name=preset).info.run_id
                up, down = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    remote.upload(run_id, path, "slot-0.ckpt")
                    t1 = time.perf_counter()
                    remote.download(run_id)
                    down.append(time.perf_counter() - t1)
                    up.append(t1 - t0)
                mb = len(data) / 1e6
                print(
                    f"{preset}: {params / 1e6:.3f}M params, checkpoint {mb:.2f} MB; loopback upload median "
                    f"{statistics.median(up):.3f} s (range {min(up):.3f}-{max(up):.3f}), download median "
                    f"{statistics.median(down):.3f} s; at 100 MB/s {mb / 100:.2f} s, at 10 MB/s {mb / 10:.1f} s",
                    flush=True,
                )
                size, took = logged_checkpoint(session, preset, args.repeats)
                print(
                    f"  as a LoggedModel (--log-checkpoints): {size / 1e6:.2f} MB, logged in median "
                    f"{statistics.median(took):.2f} s (range {min(took):.2f}-{max(took):.2f})",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
