"""Training-side benchmarks: the project's loop against a bare loop and against the
report's input pipeline, distillation against plain training, tracking on against off.

Each ``*_arms`` function returns zero-argument callables that train once and return
the seconds they measured; building models and opening runs happens outside the timer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import report_pipeline
import torch
import torch.nn.functional as F
from harness import Timer

from kd_mlflow import models, tracking
from kd_mlflow.config import Recipe
from kd_mlflow.data import DeviceData
from kd_mlflow.ensemble import Ensemble
from kd_mlflow.objectives import CachedTeacher, CrossEntropy, Distillation, OnlineTeacher, teacher_table
from kd_mlflow.runs import EpochSink
from kd_mlflow.train import Runtime, evaluate_all, fit, make_optimizer


@dataclass
class Bench:
    """What every training arm shares: one recipe, runtime and resident dataset."""

    recipe: Recipe  # epochs = epochs per timed fit call
    rt: Runtime
    dd: DeviceData
    num_classes: int

    @property
    def images(self) -> int:
        """Training images per timed call."""
        return self.recipe.epochs * self.dd.n_train


def fresh_model(b: Bench, seed: int = 0) -> torch.nn.Module:
    # Same seed, same initial weights in every arm: CPU kernels can slow down on
    # denormals, so the arms must train the same numbers, not just the same shapes.
    torch.manual_seed(seed)
    return b.rt.prepare(models.build(b.recipe, b.num_classes))


def timed_fit(b: Bench, objective, sink=None) -> float:
    model = fresh_model(b)
    with Timer(b.rt.device) as t:
        fit(model, [objective], b.dd, b.recipe, b.rt, [sink or (lambda epoch, m: None)], log=io.StringIO())
    return t.seconds


# --- 1 and 2: loop efficiency and the report's pipeline ----------------------

BARE_BATCHES = 16  # distinct input batches the bare loop cycles through


def normalised_inputs(b: Bench, model) -> torch.Tensor:
    """Network-ready float batches, computed once: the bare loop must do nothing per
    step but forward, backward and the optimiser step. Only the first few batches are
    kept and reused (compute does not depend on pixel values; 224 px floats of a whole
    training set would not fit in memory)."""
    with torch.no_grad():
        x = b.dd.train_x[: BARE_BATCHES * b.recipe.batch_size].float() / 255.0
        size = b.recipe.image_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - model.mean) / model.std
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def bare_seconds(b: Bench, x: torch.Tensor) -> float:
    net = fresh_model(b).net.train()
    opt = make_optimizer(b.recipe, net.parameters())
    y, bs = b.dd.train_y, b.recipe.batch_size
    with Timer(b.rt.device) as t:
        for _ in range(b.recipe.epochs):
            for s in range(0, len(y), bs):
                yb, k = y[s : s + bs], s % len(x)  # x holds whole batches: k + bs fits
                with b.rt.autocast():
                    logits = net(x[k : k + len(yb)])
                loss = F.cross_entropy(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return t.seconds


def report_seconds(b: Bench, workers: int) -> float:
    torch.manual_seed(0)
    # The report's code: no channels_last, no resident data, the network fed directly.
    net = models.build(b.recipe, b.num_classes).net.to(b.rt.device)
    opt = make_optimizer(b.recipe, net.parameters())
    r = b.recipe
    batches = report_pipeline.loader(
        b.dd.train_x.cpu(), b.dd.train_y.cpu(), r.image_size, r.mean, r.std, r.batch_size, workers
    )
    with Timer(b.rt.device) as t:
        for _ in range(r.epochs):
            report_pipeline.train_epoch(net, batches, opt, b.rt.device, b.rt.autocast)
    return t.seconds


def eval_seconds(b: Bench, dd_eval: DeviceData) -> float:
    """fit's per-epoch evaluation (val and test) at the preset's sizes, on its own: fit
    itself runs on tiny val/test sets so that this cost does not hide in its figure."""
    model = fresh_model(b)
    with Timer(b.rt.device) as t:
        evaluate_all(model, dd_eval, b.recipe, b.rt)
    return t.seconds


def loop_arms(b: Bench, report_workers: int, dd_eval: DeviceData) -> dict:
    x = normalised_inputs(b, fresh_model(b))
    return {
        "bare": lambda: bare_seconds(b, x),
        "fit": lambda: timed_fit(b, CrossEntropy()),
        "report": lambda: report_seconds(b, report_workers),
        "eval": lambda: eval_seconds(b, dd_eval),
    }


# --- 3: distillation from a five-model ensemble -------------------------------


def ensemble_teacher(b: Bench, members: int = 5) -> Ensemble:
    return Ensemble([fresh_model(b, seed) for seed in range(1, members + 1)]).eval()


def table_seconds(b: Bench, teacher) -> float:
    with Timer(b.rt.device) as t:
        teacher_table(teacher, b.dd, b.rt.autocast, b.recipe.eval_batch_size)
    return t.seconds


def kd_arms(b: Bench) -> dict:
    r, teacher = b.recipe, ensemble_teacher(b)
    table = teacher_table(teacher, b.dd, b.rt.autocast, r.eval_batch_size)
    cached = Distillation(CachedTeacher(table), r.temperature, r.alpha)
    online = Distillation(OnlineTeacher(teacher, b.rt.autocast), r.temperature, r.alpha)
    return {
        "plain": lambda: timed_fit(b, CrossEntropy()),
        "cached": lambda: timed_fit(b, cached),
        "online": lambda: timed_fit(b, online),
        "table": lambda: table_seconds(b, teacher),
    }


# --- 5: tracking on (a real run, EpochSink) against off -----------------------


class TimedSink:
    """Wraps a sink and keeps how long each call took."""

    def __init__(self, sink):
        self.sink, self.seconds = sink, []

    def __call__(self, epoch, metrics):
        with Timer(torch.device("cpu")) as t:
            self.sink(epoch, metrics)
        self.seconds.append(t.seconds)


def tracked_seconds(b: Bench, session, sink_log: list) -> float:
    writer = tracking.RunWriter(session, None, "bench-tracking")
    try:
        sink = TimedSink(EpochSink(writer))
        seconds = timed_fit(b, CrossEntropy(), sink)
        sink_log.extend(sink.seconds)
    finally:
        writer.end("FINISHED")
    return seconds


def tracking_arms(b: Bench, session, sink_log: list) -> dict:
    return {"off": lambda: timed_fit(b, CrossEntropy()), "on": lambda: tracked_seconds(b, session, sink_log)}


# --- 6: bfloat16 autocast against float32 on the CPU ---------------------------


def precision_arms(b: Bench) -> dict:
    """The same fit (network, batches, first weights) in float32 and under bf16
    autocast: a native-bf16 CPU's speed-up (emulated bf16 elsewhere, slower)."""
    bf16 = Bench(b.recipe, Runtime(b.rt.device, "bf16"), b.dd, b.num_classes)
    fp32 = Bench(b.recipe, Runtime(b.rt.device, "fp32"), b.dd, b.num_classes)
    return {"fp32": lambda: timed_fit(fp32, CrossEntropy()), "bf16": lambda: timed_fit(bf16, CrossEntropy())}
