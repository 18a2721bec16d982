"""Timing helpers and the synthetic dataset shared by every benchmark.

Every comparison runs its arms interleaved, one repetition of each in turn, so that
drift of the machine (thermal, other load, allocator state) hits all arms alike; the
figure is a ratio of medians, with the spread of the per-repetition ratios beside it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kd_mlflow import data


@dataclass
class Samples:
    """Seconds per repetition, by arm name, and the share of the machine that other
    processes used meanwhile (see :class:`ForeignLoad`)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    foreign: dict[str, list[float]] = field(default_factory=dict)

    def median(self, arm: str) -> float:
        return statistics.median(self.seconds[arm])

    def paired(self, a: str, b: str) -> list[float]:
        """a/b within each repetition: how much the ratio moves from rep to rep."""
        return [x / y for x, y in zip(self.seconds[a], self.seconds[b], strict=True)]


def interleave(arms: dict[str, Callable[[], float]], reps: int, warmup: int = 1) -> Samples:
    """Run each arm ``reps`` times, rotating the order every repetition (A B C, B C A,
    ...) so no arm always runs first or last. Each arm returns the seconds it measured
    itself, which keeps its setup (building models, opening runs) out of the figure.
    Warm-up repetitions fill the allocator and caches and are thrown away."""
    names = list(arms)
    out = Samples({n: [] for n in names}, {n: [] for n in names})
    for rep in range(warmup + reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            with ForeignLoad() as load:
                seconds = arms[name]()
            if rep >= warmup:
                out.seconds[name].append(seconds)
                out.foreign[name].append(load.share)
    return out


class ForeignLoad:
    """The share of all CPUs busy with other processes during a block: machine-wide
    busy time from /proc/stat minus this process's and its waited-for children's.
    On a shared machine a sample with a large share measured the neighbours too.
    (A server this process started counts as foreign: it is not waited for.)"""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        foreign = (_busy_seconds() - self.busy0) - (_own_seconds() - self.own0)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def _busy_seconds() -> float:
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")  # not Linux: the share is unknown, not zero
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the benchmark: it ends as 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM (a `timeout`, a scheduler) and SIGINT end the block as an exception
    (:class:`Stopped`), so every service started inside it stops on the way out: each
    ``with`` block's exit stops its mlflow server's or PostgreSQL's process group (by
    default SIGTERM ends Python at once, no ``finally`` run, and they stayed up). Then
    the process groups of children still alive (a writers' host, in its own session)
    are killed."""

    def on_signal(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        raise Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Stopped:
        kill_children()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def kill_children() -> None:
    """SIGKILL to the process group of each child of this process still alive, where
    it leads its own group (a child in this process's group dies with it, or is waited
    for by whoever started it)."""
    for pid in _children():
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)


def _children() -> list[int]:
    """This process's children, from /proc (Linux; elsewhere none are known)."""
    me, found = os.getpid(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # the field after the state: the parent
                found.append(int(entry.name))
    return found


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
    ratio: below 1 means ``a`` is faster), the medians, and the raw samples. The
    median of the per-repetition ratios is there too: it resists a neighbour's burst
    of load better when the machine is shared."""
    paired = samples.paired(a, b)
    foreign = [x for n in (a, b) for x in samples.foreign.get(n, [])]
    entry = {
        "ratio": samples.median(a) / samples.median(b),
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_range": [min(paired), max(paired)],
        # On a loaded machine the fastest repetition is the least disturbed one.
        "ratio_of_minimums": min(samples.seconds[a]) / min(samples.seconds[b]),
        "median_seconds": {a: samples.median(a), b: samples.median(b)},
        "foreign_cpu_share_median": statistics.median(foreign) if foreign else None,
        "samples_seconds": samples.seconds,
        "samples_foreign_cpu_share": samples.foreign,
        "reps": len(paired),
    }
    if images:
        entry["images_per_second"] = {n: images / samples.median(n) for n in samples.seconds}
    return {**entry, **extra}


# --- data ----------------------------------------------------------------------


def synthetic_source(n_train: int, n_test: int, size: int = 32, classes: int = 10, seed: int = 0) -> data.Source:
    """Random uint8 images of CIFAR shape: offline, and compute does not depend on the
    pixels, so the timings are those of real CIFAR-10 at the same sizes."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def labels(n):
        return torch.randint(0, classes, (n,), generator=g)

    return data.Source(
        "synthetic",
        "benchmarks/harness.py",
        tuple(map(str, range(classes))),
        images(n_train),
        labels(n_train),
        images(n_test),
        labels(n_test),
    )


def first_split(source: data.Source, n_train: int, n_val: int) -> data.Split:
    """The first n_val images are validation, the next n_train are training."""
    idx = torch.arange(n_val + n_train)
    return data.Split(idx[n_val:], idx[:n_val], "synthetic")
