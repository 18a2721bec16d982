"""The prepared GPU check (issue 15): throughput, loop efficiency, packing and memory on
one GPU, and the projected wall time of the seed-report study, as one JSON file.

    python benchmarks/gpu_check.py OUT.json              # one H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --dry-run OUT.json    # the CPU, tiny sizes: seconds

Every measurement is time-boxed the same way: one warm-up epoch of ``warmup`` steps
(cudnn autotuning, torch.compile, the allocator) that is thrown away, then one timed
epoch of ``steps`` steps between two ``torch.cuda.synchronize()`` calls. Data are
synthetic uint8 CIFAR-shaped tensors on the device (compute does not depend on pixel
values); the model resizes them to the preset's image size itself, as in a real run.
Measurements run in order of importance; once ``--budget-s`` is spent the optional
ones left (listed under "skipped") are not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import harness  # noqa: E402
import pack_bench  # noqa: E402
import torch  # noqa: E402
import train_bench  # noqa: E402

from kd_mlflow import data  # noqa: E402
from kd_mlflow.config import PRESETS  # noqa: E402
from kd_mlflow.objectives import CrossEntropy  # noqa: E402
from kd_mlflow.train import _train_epoch, evaluate_all, make_runtime  # noqa: E402

# The seed-report study: 11 trainings (5 seeds, 1 KD student, 5 SD students) of
# 100 epochs on 45,000 images, each epoch evaluating 5,000 val + 10,000 test images.
STUDY_TRAININGS, STUDY_EPOCHS, STUDY_TRAIN_IMAGES, STUDY_EVAL_IMAGES = 11, 100, 45_000, 15_000


@dataclass(frozen=True)
class Sizes:
    steps_224: int  # timed training steps at 224 px
    steps_32: int  # timed training steps at 32 px
    warmup: int  # warm-up steps before each timing (one thrown-away epoch)
    eval_batches: int  # timed evaluation batches (of the preset's eval_batch_size)
    batch_size: int | None = None  # None: the preset's
    width: int | None = None  # None: the preset's
    image_size: int | None = None  # None: the preset's (224 for seed-report)
    compile_backend: str = "inductor"


GPU = Sizes(steps_224=30, steps_32=100, warmup=8, eval_batches=6)
# The CPU dry run: the same code paths at toy sizes; torch.compile traces with dynamo
# but runs eagerly (no C++ toolchain or minutes of inductor compilation needed).
DRY = Sizes(
    steps_224=2, steps_32=2, warmup=1, eval_batches=1, batch_size=4, width=4, image_size=16, compile_backend="eager"
)


class Check:
    def __init__(self, sizes: Sizes, device: str, budget_s: float):
        self.sizes, self.device = sizes, torch.device(device)
        self.deadline = time.perf_counter() + budget_s
        self.skipped: list[str] = []

    def recipe(self, preset: str, **overrides):
        s = self.sizes
        sized = {k: v for k, v in (("batch_size", s.batch_size), ("width", s.width)) if v}
        if s.image_size and PRESETS[preset].image_size != 32:
            sized["image_size"] = s.image_size
        return PRESETS[preset].replace(**{**sized, **overrides})

    def bench(self, recipe, steps: int, eval_images: int = 0, epochs: int = 1) -> train_bench.Bench:
        recipe = recipe.replace(epochs=epochs, val_size=max(1, eval_images), train_subset=0)
        rt = make_runtime(recipe, str(self.device))  # cudnn.benchmark and TF32 on CUDA
        n = steps * recipe.batch_size
        source = harness.synthetic_source(n + recipe.val_size, 1)
        dd = data.DeviceData(source, harness.first_split(source, n, recipe.val_size), rt.device)
        return train_bench.Bench(recipe, rt, dd, source.num_classes)

    def time_left(self, name: str) -> bool:
        if time.perf_counter() < self.deadline:
            return True
        self.skipped.append(name)
        return False


# --- measurements ------------------------------------------------------------------


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU dry run: the process's peak resident set (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_images_per_second(c: Check, recipe, steps: int, compile: bool = False) -> dict:
    """Our loop (DeviceData batches, the objective, scheduler, metrics) on one network."""
    b = c.bench(recipe, steps, epochs=2)
    model = train_bench.fresh_model(b)
    optimizer, scheduler, order = pack_bench._loop_state(b, model.parameters())
    step = torch.compile(model, backend=c.sizes.compile_backend) if compile else model

    def epoch():
        _train_epoch(step, [CrossEntropy()], b.dd, b.recipe, b.rt, optimizer, scheduler, order)

    with harness.Timer(b.rt.device) as warm:
        epoch_of(b, epoch, c.sizes.warmup)
    _reset_peak(b.rt.device)
    with harness.Timer(b.rt.device) as t:
        epoch()
    return {
        "images_per_second": b.dd.n_train / t.seconds,
        "seconds": t.seconds,
        "images": b.dd.n_train,
        "warmup_seconds": warm.seconds,
        "peak_memory_gib": _peak_gib(b.rt.device),
        "precision": b.rt.precision,
        "compiled": compile,
        "batch_size": b.recipe.batch_size,
        "image_size": b.recipe.image_size,
        "width": b.recipe.width,
        "memory_format": "channels_last" if b.rt.device.type == "cuda" else "contiguous",
    }


def epoch_of(b: train_bench.Bench, epoch, warmup_steps: int):
    """Run ``epoch`` on only the first ``warmup_steps`` batches (the warm-up)."""
    full = b.dd.train_y, b.dd.train_x
    n = warmup_steps * b.recipe.batch_size
    b.dd.train_y, b.dd.train_x = full[0][:n], full[1][:n]
    try:
        epoch()
    finally:
        b.dd.train_y, b.dd.train_x = full


def eval_images_per_second(c: Check, recipe) -> dict:
    """fit's validation pass (train.evaluate_all, no test) at the preset's eval batch size."""
    n = c.sizes.eval_batches * recipe.eval_batch_size
    b = c.bench(recipe, 1, eval_images=n)
    model = train_bench.fresh_model(b)
    evaluate_all(model, b.dd, b.recipe, b.rt, test=False)  # warm-up
    _reset_peak(b.rt.device)
    with harness.Timer(b.rt.device) as t:
        evaluate_all(model, b.dd, b.recipe, b.rt, test=False)
    return {
        "images_per_second": n / t.seconds,
        "seconds": t.seconds,
        "images": n,
        "peak_memory_gib": _peak_gib(b.rt.device),
        "precision": b.rt.precision,
        "eval_batch_size": b.recipe.eval_batch_size,
    }


def loop_efficiency(c: Check, recipe, steps: int) -> dict:
    """Our loop's images/s over a bare forward/backward/step loop's on pre-normalised
    float batches (train_bench.bare_seconds), same network, batch and precision."""
    b = c.bench(recipe, steps)
    x = train_bench.normalised_inputs(b, train_bench.fresh_model(b))
    s = harness.interleave({"bare": lambda: train_bench.bare_seconds(b, x), "ours": lambda: ours_seconds(b)}, reps=1)
    ours, bare = s.median("ours"), s.median("bare")
    return {
        "ratio": bare / ours,
        "images_per_second": {"ours": b.images / ours, "bare": b.images / bare},
        "images": b.images,
        "precision": b.rt.precision,
    }


def ours_seconds(b: train_bench.Bench) -> float:
    """One epoch of our loop on a fresh network (the `ours` arm of loop_efficiency)."""
    model = train_bench.fresh_model(b)
    optimizer, scheduler, order = pack_bench._loop_state(b, model.parameters())
    with harness.Timer(b.rt.device) as t:
        _train_epoch(model, [CrossEntropy()], b.dd, b.recipe, b.rt, optimizer, scheduler, order)
    return t.seconds


def pack_speedup(c: Check, recipe, steps: int, k: int = pack_bench.NETWORKS) -> dict:
    """k lone networks one after another / the same k packed (kd_mlflow.pack)."""
    b = c.bench(recipe, steps)
    peaks = {}

    def arm(name, fn):
        def run():
            _reset_peak(b.rt.device)
            seconds = fn(b, k)
            peaks[name] = _peak_gib(b.rt.device)
            return seconds

        return run

    s = harness.interleave(
        {"lone": arm("lone", pack_bench.lone_seconds), "packed": arm("packed", pack_bench.packed_seconds)}, reps=1
    )
    return {
        "ratio": s.median("lone") / s.median("packed"),
        "networks": k,
        "seconds": {"lone": s.median("lone"), "packed": s.median("packed")},
        "images_per_second_per_network": {
            "lone": k * b.images / s.median("lone"),
            "packed": k * b.images / s.median("packed"),
        },
        "peak_memory_gib": peaks,
        "width": b.recipe.width,
        "image_size": b.recipe.image_size,
        "precision": b.rt.precision,
        "batch_size": b.recipe.batch_size,
    }


def projection(train_ips: float, eval_ips: float, label: str) -> dict:
    per_epoch_train = STUDY_TRAIN_IMAGES / train_ips
    per_epoch_eval = STUDY_EVAL_IMAGES / eval_ips
    total = STUDY_TRAININGS * STUDY_EPOCHS * (per_epoch_train + per_epoch_eval)
    return {
        "seconds": total,
        "hours": total / 3600,
        "runtime": label,
        "arithmetic": (
            f"{STUDY_TRAININGS} trainings x {STUDY_EPOCHS} epochs x ({STUDY_TRAIN_IMAGES} images / "
            f"{train_ips:.0f} img/s + {STUDY_EVAL_IMAGES} images / {eval_ips:.0f} img/s) = "
            f"{STUDY_TRAININGS} x {STUDY_EPOCHS} x ({per_epoch_train:.2f} s + {per_epoch_eval:.2f} s) "
            f"= {total:.0f} s = {total / 3600:.2f} h"
        ),
    }


def packed_projection(lone: dict, speedup: float) -> dict:
    """The same study with the two five-network waves (seeds, SD students) packed: their
    training time divided by the measured 224 px pack speed-up; evaluation unchanged
    (a packed epoch evaluates K networks in one pass too, but it is not measured here)."""
    train = STUDY_EPOCHS * STUDY_TRAIN_IMAGES / lone["train_ips"]
    ev = STUDY_EPOCHS * STUDY_EVAL_IMAGES / lone["eval_ips"]
    total = (1 + 10 / speedup) * train + STUDY_TRAININGS * ev
    return {
        "seconds": total,
        "hours": total / 3600,
        "arithmetic": (
            f"(1 lone + 10 packed / {speedup:.2f}) x {train:.0f} s training per run + 11 x "
            f"{ev:.0f} s evaluation per run = {total:.0f} s = {total / 3600:.2f} h"
        ),
    }


def run(c: Check) -> dict:
    s = c.sizes
    report = {p: c.recipe("seed-report", precision=p) for p in ("fp32", "bf16")}
    out: dict = {"seed_report_train": {}, "seed_report_eval": {}}

    def timed(name, fn, *args, optional=False, **kw):
        if optional and not c.time_left(name):
            return None
        t0 = time.perf_counter()
        value = fn(c, *args, **kw)
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return value

    for p in ("fp32", "bf16"):
        out["seed_report_train"][f"{p}_eager"] = timed(
            f"seed_report {p} eager", train_images_per_second, report[p], s.steps_224
        )
        out["seed_report_eval"][p] = timed(f"seed_report eval {p}", eval_images_per_second, report[p])
    standard = c.recipe("standard", precision="bf16")
    out["standard_train"] = {"bf16_eager": timed("standard bf16 eager", train_images_per_second, standard, s.steps_32)}
    out["loop_efficiency"] = {"standard_bf16": timed("loop efficiency standard", loop_efficiency, standard, s.steps_32)}
    cpu_demo = c.recipe("cpu-demo", precision="bf16")
    out["pack_speedup"] = {
        "cpu_demo_width_32px": timed("pack cpu-demo", pack_speedup, cpu_demo, s.steps_32),
        "standard_32px": timed("pack standard", pack_speedup, standard, s.steps_32),
    }
    # Optional from here, in order of importance (compilation takes a minute or two each).
    out["pack_speedup"]["seed_report_bf16_224px"] = timed(
        "pack seed-report 224", pack_speedup, report["bf16"], s.steps_224 // 2 or 1, optional=True
    )
    out["seed_report_train"]["bf16_compiled"] = timed(
        "seed_report bf16 compiled", train_images_per_second, report["bf16"], s.steps_224, compile=True, optional=True
    )
    out["standard_train"]["bf16_compiled"] = timed(
        "standard bf16 compiled", train_images_per_second, standard, s.steps_32, compile=True, optional=True
    )
    out["seed_report_train"]["fp32_compiled"] = timed(
        "seed_report fp32 compiled", train_images_per_second, report["fp32"], s.steps_224, compile=True, optional=True
    )
    out["loop_efficiency"]["seed_report_bf16"] = timed(
        "loop efficiency seed-report", loop_efficiency, report["bf16"], s.steps_224, optional=True
    )
    out["projected_seed_report_study"] = _projections(out)
    out["peak_memory_gib"] = max(_peaks(out))
    return out


def _projections(out: dict) -> dict:
    tr, ev = out["seed_report_train"], out["seed_report_eval"]
    proj = {}
    # The preset's runtime on a GPU: precision auto = bf16, eager (kd-mlflow study default).
    for name, train_key, eval_key in (
        ("bf16_eager", "bf16_eager", "bf16"),
        ("fp32_eager_as_the_report", "fp32_eager", "fp32"),
        ("bf16_compiled", "bf16_compiled", "bf16"),
    ):
        if tr.get(train_key):
            proj[name] = projection(tr[train_key]["images_per_second"], ev[eval_key]["images_per_second"], name)
    packed = out["pack_speedup"].get("seed_report_bf16_224px")
    if packed:
        proj["bf16_eager_waves_packed"] = packed_projection(
            {"train_ips": tr["bf16_eager"]["images_per_second"], "eval_ips": ev["bf16"]["images_per_second"]},
            packed["ratio"],
        )
    return proj


def _peaks(tree, inside: bool = False) -> list[float]:
    """Every number under a "peak_memory_gib" key."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _peaks(v, inside or k == "peak_memory_gib")]
    return [tree] if inside and isinstance(tree, float) else []


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info.update(
            gpu_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
        )
    else:
        info["gpu_name"] = f"none (CPU dry run: {platform.processor() or platform.machine()})"
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, default=None, help="JSON file to write [$OUT/gpu.json, or ./gpu.json]")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, seconds: checks the script")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds after which optional measurements are skipped [330; dry run: 600]",
    )
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu.json"
    if args.dry_run:
        device, sizes = "cpu", DRY
        torch.set_num_threads(1)  # a check of the code paths: steady on a shared CPU
    elif torch.cuda.is_available():
        device, sizes = "cuda", GPU
    else:
        p.error("no CUDA device: use --dry-run to check the script on the CPU")
    c = Check(sizes, device, args.budget_s or (600 if args.dry_run else 330))
    t0 = time.perf_counter()
    res = run(c)
    res["machine"] = machine(c.device)
    res["gpu_name"] = res["machine"]["gpu_name"]
    res["sizes"] = asdict(sizes)
    res["dry_run"] = args.dry_run
    res["skipped"] = c.skipped
    res["total_seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"[gpu_check] wrote {out} in {res['total_seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
