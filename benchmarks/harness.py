"""Timing helpers and the synthetic dataset shared by every benchmark.

Every comparison runs its arms interleaved, one repetition of each in turn, so that
drift of the machine (thermal, other load, allocator state) hits all arms alike; the
figure is a ratio of medians, with the spread of the per-repetition ratios beside it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kd_mlflow import data


@dataclass
class Samples:
    """Seconds per repetition, by arm name."""
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, arm: str) -> float:
        return statistics.median(self.seconds[arm])

    def paired(self, a: str, b: str) -> list[float]:
        """a/b within each repetition: how much the ratio moves from rep to rep."""
        return [x / y for x, y in zip(self.seconds[a], self.seconds[b])]


def interleave(arms: dict[str, Callable[[], float]], reps: int, warmup: int = 1) -> Samples:
    """Run each arm ``reps`` times, rotating the order every repetition (A B C, B C A,
    ...) so no arm always runs first or last. Each arm returns the seconds it measured
    itself, which keeps its setup (building models, opening runs) out of the figure.
    Warm-up repetitions fill the allocator and caches and are thrown away."""
    names = list(arms)
    out = Samples({n: [] for n in names})
    for rep in range(warmup + reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            seconds = arms[name]()
            if rep >= warmup:
                out.seconds[name].append(seconds)
    return out


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def ratio_entry(samples: Samples, a: str, b: str, images: int | None = None, **extra) -> dict:
    """A figure for the JSON: ratio of median seconds of ``a`` over ``b`` (a time
    ratio: below 1 means ``a`` is faster), the medians, and the raw samples."""
    entry = {"ratio": samples.median(a) / samples.median(b),
             "paired_ratio_range": [min(samples.paired(a, b)), max(samples.paired(a, b))],
             "median_seconds": {a: samples.median(a), b: samples.median(b)},
             "samples_seconds": samples.seconds, "reps": len(samples.seconds[a])}
    if images:
        entry["images_per_second"] = {n: images / samples.median(n) for n in samples.seconds}
    return {**entry, **extra}


# --- data ----------------------------------------------------------------------

def synthetic_source(n_train: int, n_test: int, size: int = 32, classes: int = 10,
                     seed: int = 0) -> data.Source:
    """Random uint8 images of CIFAR shape: offline, and compute does not depend on the
    pixels, so the timings are those of real CIFAR-10 at the same sizes."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def labels(n):
        return torch.randint(0, classes, (n,), generator=g)

    return data.Source("synthetic", "benchmarks/harness.py", tuple(map(str, range(classes))),
                       images(n_train), labels(n_train), images(n_test), labels(n_test))


def first_split(source: data.Source, n_train: int, n_val: int) -> data.Split:
    """The first n_val images are validation, the next n_train are training."""
    idx = torch.arange(n_val + n_train)
    return data.Split(idx[n_val:], idx[:n_val], "synthetic")
