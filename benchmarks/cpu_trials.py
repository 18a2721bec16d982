"""What else might speed up a CPU study: channels-last memory, torch.compile (its compile
time counted over a real run's steps) and the evaluation batch size, each against the
project's default, on cpu-converge's network at its resolved precision, interleaved.

    python benchmarks/cpu_trials.py [--reps 3] [--steps 10] [--json PATH]

Prints one JSON object. Each arm times the same number of training steps of batch 128
(Adam, the preset's recipe) on the same fixed inputs; ``compile`` also reports its first
call's seconds and what it would add to a study run of ``epochs x steps_per_epoch``
steps. Evaluation arms time one pass over 2,000 images at each batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness
import torch
import torch.nn.functional as F

from kd_mlflow import machine, models
from kd_mlflow.config import PRESETS
from kd_mlflow.train import make_optimizer, make_runtime, plan_run

PRESET = "cpu-converge"


def _network(recipe, channels_last: bool):
    torch.manual_seed(0)
    model = models.build(recipe, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def _inputs(recipe, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, recipe.image_size, recipe.image_size), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def train_arm(recipe, rt, steps: int, channels_last=False, compiled=False, first: dict | None = None):
    """A callable that trains ``steps`` steps of a fresh network and returns their seconds;
    with ``compiled``, the first call's compile time goes into ``first['seconds']``."""
    x, y = _inputs(recipe, recipe.batch_size)

    def once() -> float:
        model = _network(recipe, channels_last).train()
        step_model = torch.compile(model) if compiled else model
        opt = make_optimizer(recipe, model.parameters())

        def step():
            with rt.autocast():
                logits = step_model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if compiled and first is not None and "seconds" not in first:
            t0 = time.perf_counter()
            step()
            first["seconds"] = time.perf_counter() - t0
        else:
            step()  # one untimed step: allocator, lazy init
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t0

    return once


def eval_arm(recipe, rt, images: int, batch: int, channels_last=False):
    x, _ = _inputs(recipe, images)
    model = _network(recipe, channels_last).eval()

    def once() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), rt.autocast():
            for i in range(0, images, batch):
                model(x[i : i + batch]).float().softmax(1)
        return time.perf_counter() - t0

    return once


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    recipe = plan_run(PRESETS[PRESET], PRESET, "cpu")
    rt = make_runtime(recipe, "cpu")
    out: dict = {"cpu": machine.cpu_model(), "threads": torch.get_num_threads(), "precision": rt.precision}

    arms = {"default": train_arm(recipe, rt, a.steps), "channels_last": train_arm(recipe, rt, a.steps, True)}
    first: dict = {}
    if not a.no_compile:
        arms["compile"] = train_arm(recipe, rt, a.steps, compiled=True, first=first)
    s = harness.interleave(arms, a.reps)
    base = s.median("default")
    steps_per_run = recipe.epochs * -(-(recipe.train_subset or 0) // recipe.batch_size)
    out["train"] = {
        name: {"seconds_per_step": s.median(name) / a.steps, "speedup_over_default": base / s.median(name)}
        for name in arms
    }
    if first:
        saved = (base - s.median("compile")) / a.steps * steps_per_run
        out["train"]["compile"].update(first_call_seconds=first["seconds"], saved_per_run_seconds=saved)
        out["train"]["compile"]["steps_per_run"] = steps_per_run

    sizes = sorted({128, 256, recipe.eval_batch_size, 1024, 2048})
    ev = harness.interleave({str(b): eval_arm(recipe, rt, a.eval_images, b) for b in sizes}, a.reps)
    ev_cl = harness.interleave(
        {
            "default": eval_arm(recipe, rt, a.eval_images, recipe.eval_batch_size),
            "channels_last": eval_arm(recipe, rt, a.eval_images, recipe.eval_batch_size, True),
        },
        a.reps,
    )
    at_default = ev.median(str(recipe.eval_batch_size))
    out["eval"] = {
        "images": a.eval_images,
        "default_batch": recipe.eval_batch_size,
        "seconds": {b: ev.median(b) for b in ev.seconds},
        "speedup_over_default": {b: at_default / ev.median(b) for b in ev.seconds},
        "channels_last_speedup": ev_cl.median("default") / ev_cl.median("channels_last"),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
