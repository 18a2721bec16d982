"""kd-mlflow benchmarks: ratios measured side by side on one machine, in one run.

    python benchmarks/run.py [--quick] [--json PATH] [--device auto|cpu|cuda]

Prints a table and writes every figure, with its raw samples, to JSON. Nothing here
asserts a speed: the targets are printed beside the figures for the reader.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # tests/mlflow_server.py, and kd_mlflow when not installed

import compare_bench  # noqa: E402
import harness  # noqa: E402
import load  # noqa: E402
import pack_bench  # noqa: E402
import threads_bench  # noqa: E402
import torch  # noqa: E402
import train_bench  # noqa: E402

from kd_mlflow import data, tracking  # noqa: E402
from kd_mlflow import machine as kd_machine  # noqa: E402
from kd_mlflow.config import PRESETS  # noqa: E402
from kd_mlflow.train import make_runtime  # noqa: E402


@dataclass(frozen=True)
class Plan:
    preset: str
    n_train: int  # training images per epoch
    n_eval: int  # val and test images each: small, so fit's per-epoch
    # evaluation does not count as loop overhead (docs/benchmarks.md)
    reps: int  # measured repetitions per arm (plus one warm-up)
    fit_epochs: int  # epochs per timed call (loop, KD)
    tracking_epochs: int  # epochs per timed call with tracking on/off
    compare_sizes: tuple = (100, 1000)  # runs in the experiment compare reads
    compare_reps: int = 3
    history_epochs: int = 4  # per-epoch metric history logged per run (capped by preset)
    threads: int = 1  # torch intra-op threads, the same for every arm
    pack_networks: int = pack_bench.NETWORKS  # networks per wave, lone and packed
    pack_reps: int = 3  # each repetition trains 2 * pack_networks networks
    thread_reps: int = 2  # fresh processes per thread setting and number of busy processes


def make_plan(quick: bool, device: str) -> Plan:
    threads = os.cpu_count() or 1
    if quick:
        return Plan("cpu-demo", n_train=1024, n_eval=16, reps=6, fit_epochs=1, tracking_epochs=2, threads=threads)
    gpu = device == "cuda"
    return Plan(
        "standard" if gpu else "cpu-demo",
        n_train=45000 if gpu else 10000,
        n_eval=128,
        reps=5,
        fit_epochs=1,
        tracking_epochs=3,
        compare_reps=5,
        history_epochs=100,
        threads=threads,
    )


def make_bench(plan: Plan, device: str, epochs: int) -> train_bench.Bench:
    recipe = PRESETS[plan.preset].replace(epochs=epochs, val_size=plan.n_eval, train_subset=0)
    rt = make_runtime(recipe, device)
    size = 32  # CIFAR; the model resizes to recipe.image_size itself
    source = harness.synthetic_source(plan.n_eval + plan.n_train, plan.n_eval, size)
    dd = data.DeviceData(source, harness.first_split(source, plan.n_train, plan.n_eval), rt.device)
    return train_bench.Bench(recipe, rt, dd, source.num_classes)


def preset_eval_sizes(plan: Plan) -> tuple[int, int]:
    """Val and test images per epoch in the preset's proportion to its training set
    (CIFAR-10's 50,000/10,000 images), scaled to ``plan.n_train``."""
    r = PRESETS[plan.preset]
    train = r.train_subset or 50_000 - r.val_size
    return round(plan.n_train * r.val_size / train), round(plan.n_train * 10_000 / train)


def eval_data(plan: Plan, b: train_bench.Bench) -> data.DeviceData:
    n_val, n_test = preset_eval_sizes(plan)
    source = harness.synthetic_source(n_val + 1, n_test, seed=1)
    return data.DeviceData(source, harness.first_split(source, 1, n_val), b.rt.device)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the figures --------------------------------------------------------------


def bench_loop(plan: Plan, b: train_bench.Bench) -> dict:
    workers = 0 if b.rt.device.type == "cpu" else min(4, os.cpu_count() or 1)
    dd_eval = eval_data(plan, b)
    log(f"loop: bare / fit / report pipeline / eval, {b.images} images x {plan.reps} reps")
    s = harness.interleave(train_bench.loop_arms(b, workers, dd_eval), plan.reps)
    fit, ev = s.median("fit"), s.median("eval")
    return {
        "loop_efficiency": harness.ratio_entry(
            s, "bare", "fit", b.images, fit_val_images=plan.n_eval, fit_test_images=plan.n_eval
        ),
        "vs_report_pipeline": harness.ratio_entry(
            s, "report", "fit", b.images, report_workers=workers, report_image_size=b.recipe.image_size
        ),
        "eval_overhead_at_preset_sizes": {
            "ratio": (fit + ev) / fit,
            "median_seconds": {"fit": fit, "eval": ev},
            "val_images": len(dd_eval.val_y),
            "test_images": len(dd_eval.test_y),
            "samples_seconds": s.seconds["eval"],
        },
    }


def bench_kd(plan: Plan, b: train_bench.Bench) -> dict:
    log(f"kd: plain / cached / on the fly / teacher table, {b.images} images x {plan.reps} reps")
    s = harness.interleave(train_bench.kd_arms(b), plan.reps)
    epochs = PRESETS[plan.preset].epochs
    table, plain = s.median("table"), s.median("plain")
    cached = harness.ratio_entry(
        s,
        "cached",
        "plain",
        b.images,
        teacher_members=5,
        teacher_table_seconds=table,
        amortised_over_epochs=epochs,
        teacher_table_included=False,
    )
    cached["ratio_with_table_amortised"] = (s.median("cached") + table / epochs) / plain
    return {
        "kd_overhead_cached": cached,
        "kd_overhead_on_the_fly": harness.ratio_entry(s, "online", "plain", b.images, teacher_members=5),
    }


def bench_pack(plan: Plan, b: train_bench.Bench) -> dict:
    k = plan.pack_networks
    log(f"pack: {k} lone networks one after another / {k} packed, {b.images} images each x {plan.pack_reps} reps")
    s = harness.interleave(pack_bench.pack_arms(b, k), plan.pack_reps)
    return {
        "pack_speedup": harness.ratio_entry(
            s, "lone", "packed", k * b.images, networks=k, width=b.recipe.width, image_size=b.recipe.image_size
        )
    }


def bench_tracking(plan: Plan, b: train_bench.Bench) -> dict:
    log(f"tracking: off / on (real server), {b.recipe.epochs} epochs x {plan.reps} reps")
    sink_seconds: list = []
    session = tracking.connect("bench-tracking")
    s = harness.interleave(train_bench.tracking_arms(b, session, sink_seconds), plan.reps)
    per_call = statistics.median(sink_seconds)  # warm-up calls included
    epoch = s.median("off") / b.recipe.epochs
    return {
        "tracking_overhead": harness.ratio_entry(
            s, "on", "off", b.images, sink_seconds_per_epoch=per_call, ratio_from_sink_time=1 + per_call / epoch
        )
    }


def bench_bf16(plan: Plan, device: str) -> dict:
    """cpu-converge's network (whatever --preset measures elsewhere), fp32 and bf16."""
    b = make_bench(replace(plan, preset="cpu-converge"), device, plan.fit_epochs)
    log(f"bf16: fp32 / bf16 autocast, cpu-converge's network, {b.images} images x {plan.reps} reps")
    s = harness.interleave(train_bench.precision_arms(b), plan.reps)
    return {
        "cpu_bf16_speedup": harness.ratio_entry(
            s, "fp32", "bf16", b.images, native_bf16=kd_machine.native_bf16(), cpu=kd_machine.cpu_model()
        )
    }


def bench_threads(plan: Plan) -> dict:
    """threads_bench: kd-mlflow's default threads (passive waits) against one thread and
    all cores spinning, each in a fresh process beside busy processes (README)."""
    log(f"threads: default / one thread / all cores beside {THREAD_LOADS} busy processes")
    per_load = threads_bench.measure(list(THREAD_LOADS), plan.thread_reps, ("default", "one", "cores"), log=log)
    worst = min(per_load.values(), key=lambda e: e["over_one_thread"]["default"])
    return {
        "threads_under_load": {
            "ratio": worst["over_one_thread"]["default"],
            "worst_busy_processes": next(k for k, v in per_load.items() if v is worst),
            "busy": per_load,
            "cpu": kd_machine.cpu_model(),
        }
    }


THREAD_LOADS = (0, 2, 4, 8)  # busy processes beside the training


def prefill(plan: Plan, root: Path) -> dict[int, str]:
    """Experiments for ``compare``, written into the server's store before it starts."""
    root.mkdir(parents=True)
    sizes = {n: f"bench-compare-{n}" for n in plan.compare_sizes}
    for n, name in sizes.items():
        t0 = time.perf_counter()
        compare_bench.log_runs(f"sqlite:///{root / 'mlflow.db'}", name, n, plan.history_epochs)
        log(f"compare: logged {n} runs in {time.perf_counter() - t0:.1f}s")
    return sizes


def bench_compare(plan: Plan, sizes: dict[int, str], uri: str) -> dict:
    log(f"compare: library and CLI, {plan.compare_reps} reps")
    parts: dict = {}
    s = harness.interleave(compare_bench.compare_arms(sizes, uri, parts), plan.compare_reps)
    small, big = plan.compare_sizes
    out = {"runs": list(plan.compare_sizes), "history_epochs": plan.history_epochs}
    for kind in ("library", "cli"):
        g = harness.ratio_entry(s, f"{kind}_{big}", f"{kind}_{small}")
        out[kind] = {
            "seconds": g["median_seconds"],
            "growth": g["ratio"],
            "growth_range": g["paired_ratio_range"],
            "samples_seconds": g["samples_seconds"],
        }
    out["library"]["parts_median_seconds"] = {
        n: {k: statistics.median(v) for k, v in p.items()} for n, p in parts.items()
    }
    return {"compare_seconds": out}


def with_server(plan: Plan, b: train_bench.Bench) -> dict:
    from tests.mlflow_server import MlflowServer

    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        root = Path(tmp) / "server"
        sizes = prefill(plan, root)
        with MlflowServer(root) as server:
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            log(f"mlflow server at {server.uri}")
            return {**bench_tracking(plan, b), **bench_compare(plan, sizes, server.uri)}


# --- output -------------------------------------------------------------------


def _spread(e: dict) -> str:
    return "{:.3f} [{:.3f}-{:.3f}]".format(e["paired_ratio_median"], *e["paired_ratio_range"])


def _ips(e: dict, arm: str) -> str:
    return f"{arm} {e['images_per_second'][arm]:.0f} img/s"


def _rows(res: dict, plan: Plan) -> list[tuple]:
    rows = []
    if "loop_efficiency" in res:
        rows += _loop_rows(res)
    if "kd_overhead_cached" in res:
        rows += _kd_rows(res)
    if "pack_speedup" in res:
        ps = res["pack_speedup"]
        rows.append(
            (
                "pack_speedup",
                f"{ps['networks']} lone / {ps['networks']} packed, width {ps['width']}, {ps['image_size']} px",
                ps["ratio"],
                _spread(ps),
                "> 1",
            )
        )
    if "tracking_overhead" in res:
        rows += _tracking_rows(res, plan)
    if "compare_seconds" in res:
        rows += _compare_rows(res["compare_seconds"])
    rows += _cpu_rows(res)
    if "refusal_seconds" in res:
        r = res["refusal_seconds"]
        rows.append(
            (
                "refusal_seconds",
                "bad --epochs, whole process, median s",
                r["median_seconds"],
                f"[{min(r['samples_seconds']):.2f}-{max(r['samples_seconds']):.2f}] s",
                "< 1 s",
            )
        )
    return rows


def _cpu_rows(res: dict) -> list[tuple]:
    rows = []
    if "cpu_bf16_speedup" in res:
        e = res["cpu_bf16_speedup"]
        native = "native" if e["native_bf16"] else "emulated"
        rows.append(
            ("cpu_bf16_speedup", f"{_ips(e, 'bf16')} / {_ips(e, 'fp32')}, {native}", e["ratio"], _spread(e), "> 1")
        )
    if "threads_under_load" in res:
        e = res["threads_under_load"]
        detail = "default / 1 thread, worst of " + ",".join(e["busy"]) + " busy"
        rows.append(("threads_under_load", detail, e["ratio"], f"at {e['worst_busy_processes']} busy", ">= 0.33"))
        idle = e["busy"].get("0")
        if idle:
            rows.append(
                (
                    "  idle",
                    "default / all cores, no busy process",
                    idle["images_per_second"]["default"] / idle["images_per_second"]["cores"],
                    "",
                    ">= 0.9",
                )
            )
    return rows


def _loop_rows(res: dict) -> list[tuple]:
    le, vr, ev = res["loop_efficiency"], res["vs_report_pipeline"], res["eval_overhead_at_preset_sizes"]
    return [
        ("loop_efficiency", f"{_ips(le, 'fit')} / {_ips(le, 'bare')}", le["ratio"], _spread(le), ">= 0.95"),
        ("vs_report_pipeline", f"{_ips(vr, 'fit')} / {_ips(vr, 'report')}", vr["ratio"], _spread(vr), "> 1"),
        (
            "  eval at preset sizes",
            f"(fit + val {ev['val_images']} + test {ev['test_images']}) / fit",
            ev["ratio"],
            "",
            "",
        ),
    ]


def _kd_rows(res: dict) -> list[tuple]:
    kc, ko = res["kd_overhead_cached"], res["kd_overhead_on_the_fly"]
    return [
        ("kd_overhead_cached", "teacher table excluded", kc["ratio"], _spread(kc), "<= 1.05"),
        (
            "  table amortised",
            f"table {kc['teacher_table_seconds']:.2f}s over {kc['amortised_over_epochs']} epochs",
            kc["ratio_with_table_amortised"],
            "",
            "",
        ),
        ("kd_overhead_on_the_fly", "5-model teacher on every batch", ko["ratio"], _spread(ko), ""),
    ]


def _tracking_rows(res: dict, plan: Plan) -> list[tuple]:
    tr = res["tracking_overhead"]
    return [
        ("tracking_overhead", f"on / off, {plan.tracking_epochs} epochs per run", tr["ratio"], _spread(tr), "<= 1.01"),
        (
            "  from sink time",
            f"{1000 * tr['sink_seconds_per_epoch']:.1f} ms per epoch",
            tr["ratio_from_sink_time"],
            "",
            "<= 1.01",
        ),
    ]


def _compare_rows(cs: dict) -> list[tuple]:
    small, big = cs["runs"]
    rows = []
    for kind in ("library", "cli"):
        sec = cs[kind]["seconds"]
        rows.append(
            (
                f"compare_seconds {kind}",
                f"{small} runs {sec[f'{kind}_{small}']:.2f}s -> {big} runs {sec[f'{kind}_{big}']:.2f}s",
                sec[f"{kind}_{big}"],
                f"growth {cs[kind]['growth']:.2f}x",
                f"<= 2 s; growth <= {big // small}x",
            )
        )
    return rows


def table(res: dict, plan: Plan) -> str:
    rows = _rows(res, plan)
    lines = [f"{'figure':<24} {'detail':<46} {'value':>7}  {'per-rep ratio [range]':<22} target"]
    lines += [f"{n:<24} {d:<46} {v:>7.3f}  {r:<22} {t}" for n, d, v, r, t in rows]
    busy = [
        e["foreign_cpu_share_median"]
        for e in res.values()
        if isinstance(e, dict) and e.get("foreign_cpu_share_median") is not None
    ]
    if busy and max(busy) > 0.10:
        lines.append(
            f"note: other processes used up to {100 * max(busy):.0f}% of the CPUs during "
            "the measurements (median per figure); the figures measured them too."
        )
    return "\n".join(lines)


def machine(rt_device: torch.device, plan: Plan) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(rt_device),
    }
    if rt_device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt_device)
    import mlflow

    return {**info, "mlflow": mlflow.__version__, "plan": asdict(plan)}


# server: tracking_overhead and compare_seconds; load: the shared server under load (load.py)
GROUPS = ("loop", "kd", "pack", "server", "refusal", "load", "bf16", "threads")


def bench_refusal(plan: Plan) -> dict:
    """Whole process: `kd-mlflow train` refusing a bad --epochs (nothing heavy may load)."""
    argv = [sys.executable, "-m", "kd_mlflow", "train", "--seed", "0", "--epochs", "0"]

    def once() -> float:
        t0 = time.perf_counter()
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if out.returncode != 2:
            raise RuntimeError(f"expected exit 2, got {out.returncode}: {out.stderr[-500:]}")
        return seconds

    samples = sorted(once() for _ in range(5 if plan.compare_reps <= 3 else 9))
    log(f"refusal: {samples}")
    return {
        "refusal_seconds": {
            "median_seconds": statistics.median(samples),
            "samples_seconds": samples,
            "target_seconds": 1.0,
        }
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a 2-core CPU")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="model and recipe to measure [cpu-demo; standard on a GPU in full mode]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every arm [all cores]; 1 is steadier on a shared machine",
    )
    p.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated figure groups to run, of {', '.join(GROUPS)} [all]"
    )
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(GROUPS):
        p.error(f"--only: choose from {', '.join(GROUPS)}")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # keep stdout the table
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan(args.quick, device)
    plan = replace(plan, preset=args.preset or plan.preset, threads=args.threads or plan.threads)
    torch.set_num_threads(plan.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()
    res = {}
    trains = [name for name in ("loop", "kd", "pack") if name in only]
    b = make_bench(plan, device, plan.fit_epochs) if trains else None
    for name, bench in (("loop", bench_loop), ("kd", bench_kd), ("pack", bench_pack)):
        if name in trains:
            res.update(bench(plan, b))
    if "server" in only:
        res.update(with_server(plan, make_bench(plan, device, plan.tracking_epochs)))
    if "refusal" in only:
        res.update(bench_refusal(plan))
    if "bf16" in only and device == "cpu":
        res.update(bench_bf16(plan, device))
    if "threads" in only and device == "cpu":
        res.update(bench_threads(plan))
    if "load" in only:
        res.update(load.bench_load(load.Shape(), log=log))
    res["machine"] = machine(torch.device(device), plan)
    res["machine"].update(total_seconds=time.perf_counter() - t0, load_average_at_start=load0)
    print(table(res, plan))
    if "scenarios" in res.get("load", {}):
        print(load.table(res["load"]["scenarios"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def stoppable_main(argv=None) -> int:
    """main(), stopped cleanly by SIGTERM or SIGINT: the services it started stop too."""
    try:
        with harness.stopped_by_signals():
            return main(argv)
    except harness.Stopped as e:
        log(f"{e}: the servers it started are stopped")
        return e.exit_code


if __name__ == "__main__":
    sys.exit(stoppable_main())
