"""K networks trained one after another against the same K trained as one packed
network (kd_mlflow.pack): whole training epochs, no evaluation, the same batches.

Each arm builds its models, optimisers and schedules outside the timer; both run the
library's own epoch function (``train._train_epoch``, for one network or K packed),
so the figure is the training loop's, as a study would run it.
"""

from __future__ import annotations

import torch
from harness import Timer
from train_bench import Bench, fresh_model

from kd_mlflow.objectives import CrossEntropy
from kd_mlflow.pack import pack
from kd_mlflow.train import _train_epoch, make_optimizer, make_scheduler

NETWORKS = 5  # a wave: five seeds, or five SD students


def _loop_state(b: Bench, params):
    optimizer = make_optimizer(b.recipe, params)
    scheduler = make_scheduler(b.recipe, optimizer, -(-b.dd.n_train // b.recipe.batch_size))
    return optimizer, scheduler, torch.Generator().manual_seed(b.recipe.order_seed)


def lone_seconds(b: Bench, k: int = NETWORKS, compile: bool = False) -> float:
    """Seconds to train ``k`` networks one after another (only the epochs are timed)."""
    total = 0.0
    for seed in range(1, k + 1):
        model = fresh_model(b, seed)
        optimizer, scheduler, order = _loop_state(b, model.parameters())
        step = torch.compile(model) if compile else model
        with Timer(b.rt.device) as t:
            for _ in range(b.recipe.epochs):
                _train_epoch(step, [CrossEntropy()], b.dd, b.recipe, b.rt, optimizer, scheduler, order)
        total += t.seconds
    return total


def packed_seconds(b: Bench, k: int = NETWORKS, compile: bool = False) -> float:
    """Seconds to train the same ``k`` networks as one packed network."""
    packed = b.rt.prepare(pack([fresh_model(b, seed) for seed in range(1, k + 1)]))
    optimizer, scheduler, order = _loop_state(b, packed.parameters())
    step = torch.compile(packed) if compile else packed
    objectives = [CrossEntropy()] * k
    with Timer(b.rt.device) as t:
        for _ in range(b.recipe.epochs):
            _train_epoch(step, objectives, b.dd, b.recipe, b.rt, optimizer, scheduler, order)
    return t.seconds


def pack_arms(b: Bench, k: int = NETWORKS) -> dict:
    return {"lone": lambda: lone_seconds(b, k), "packed": lambda: packed_seconds(b, k)}
