"""A shared tracking server under load, with faults.

    python benchmarks/run.py --only load [--json PATH]
    python benchmarks/load.py [--writers 32] [--scenarios steady,server-restarts,postgres-restart]

The production stack of docker/compose.yaml without docker (tests/stack_postgres.py,
tests/stack_server.py): PostgreSQL and ``mlflow server --app-name basic-auth
--workers 4``, on loopback. Writers shaped like trainings, each its own process (forked
from one host process that has imported MLflow once: a writer costs no import), each
writing one run through kd-mlflow's own code (``tracking.RunWriter``, ``runs.EpochSink``,
``runs.finishing``, the client settings of ``tracking.connect``): the header (params,
tags), a dataset input, one ``log_batch`` per epoch after a pause that stands for the
epoch's training, the final metrics, a model-sized artifact of random bytes and a
predictions artifact, then FINISHED. No torch: the model is logged as a file, not as
an MLflow model.

Scenarios: ``steady``; ``server-restarts``: the server (all its workers) SIGKILLed and
started again, twice, at a third and at two thirds of the epochs delivered;
``postgres-restart``: ``pg_ctl restart -m fast`` once, at half of the epochs. After the
writers end, every run is read back: each epoch a writer trained must be on the server
exactly once for every epoch metric (``lost_epochs``, ``duplicated_epochs``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the stack's helpers, and kd_mlflow in place

import stack_postgres  # noqa: E402
from stack_server import DOCKER, StackServer  # noqa: E402

EXPERIMENT = "load"
WRITER_USER = "writer"


@dataclass(frozen=True)
class Shape:
    """What each writer writes, and how long it may take."""

    writers: int = 32
    epochs: int = 10
    epoch_seconds: float = 1.0  # the pause that stands for an epoch's training
    model_mb: float = 4.0  # the model-sized artifact
    predictions: int = 2000  # validation and test images each, 10 classes
    deadline: float = 300.0  # seconds a writer may take before it is stopped (SIGTERM)
    workers: int = 4  # the server's
    network_timeout: float = 0.0  # the writers' KD_MLFLOW_NETWORK_TIMEOUT, seconds; 0: kd-mlflow's default


# name: (what fails, at which fractions of all epochs delivered)
SCENARIOS: dict[str, tuple[str, tuple[float, ...]]] = {
    "steady": ("", ()),
    "server-restarts": ("server", (1 / 3, 2 / 3)),
    "postgres-restart": ("postgres", (1 / 2,)),
}


def unavailable_reason() -> str | None:
    """Why the stack cannot be started here, or None."""
    reason = stack_postgres.unavailable_reason()
    if reason:
        return reason
    for module, install in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "'mlflow[auth]'")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is missing (pip install {install})"
    return None


# --- the parent: stack, writers, faults, read-back -----------------------------------


def scenario(name: str, shape: Shape, workdir: Path, log=print, faults: tuple | None = None) -> dict:
    """One scenario on a fresh stack (its faults: SCENARIOS[name], or ``faults``); the
    figures as a dict."""
    fault, at = faults or SCENARIOS[name]
    secrets_ = {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(16),
    }
    password = secrets.token_urlsafe(16)
    workdir.mkdir(parents=True, exist_ok=True)
    with stack_postgres.PostgresCluster(secrets_["POSTGRES_PASSWORD"], DOCKER / "postgres-init") as pg:
        with StackServer(workdir / "server", pg, secrets_, workers=shape.workers) as server:
            admin = ("admin", secrets_["MLFLOW_ADMIN_PASSWORD"])
            _ok(
                server.request(
                    "POST", "/api/2.0/mlflow/users/create", {"username": WRITER_USER, "password": password}, auth=admin
                )
            )
            _ok(
                server.request(
                    "POST", "/api/2.0/mlflow/experiments/create", {"name": EXPERIMENT}, auth=(WRITER_USER, password)
                )
            )
            env = {
                "MLFLOW_TRACKING_URI": server.uri,
                "MLFLOW_TRACKING_USERNAME": WRITER_USER,
                "MLFLOW_TRACKING_PASSWORD": password,
            }
            if shape.network_timeout:
                env["KD_MLFLOW_NETWORK_TIMEOUT"] = f"{shape.network_timeout:g}"
            log(f"load {name}: {shape.writers} writers against {server.uri} ({shape.workers} workers)")
            t0 = time.monotonic()
            host = _start_host(shape, env, workdir / "writers")
            faults = _drive(host, shape, workdir / "writers", fault, at, server, pg, log)
            seconds = time.monotonic() - t0
            results = _results(shape, workdir / "writers")
            back = _read_back(env, results, shape)
    return _figures(name, shape, results, back, faults, seconds)


def _ok(reply) -> None:
    status, body = reply
    if status != 200:
        raise RuntimeError(f"stack setup failed: HTTP {status}: {body}")


def _start_host(shape: Shape, env: dict, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"shape": asdict(shape), "out": str(out)})
    log = open(out / "host.log", "w")
    return subprocess.Popen(
        [sys.executable, __file__, "--host", spec],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},  # the credentials: in the environment, not on the command line
        start_new_session=True,
    )


def _delivered(out: Path) -> int:
    total = 0
    for p in out.glob("progress-*"):
        try:
            total += int(p.read_text().split()[1])
        except (OSError, ValueError, IndexError):
            pass  # being rewritten
    return total


def _drive(host, shape, out, fault, at, server, pg, log) -> list[dict]:
    """Wait for the writers, injecting the faults when the delivered epochs reach each
    fraction of the total. The host stops writers past their deadline itself; this is
    the bound of last resort."""
    total, pending, done = shape.writers * shape.epochs, list(at), []
    hard = time.monotonic() + shape.deadline + 120
    while host.poll() is None and time.monotonic() < hard:
        if pending and _delivered(out) >= pending[0] * total:
            pending.pop(0)
            done.append(_inject(fault, server, pg, _delivered(out), log))
        time.sleep(0.2)
    if host.poll() is None:
        os.killpg(host.pid, signal.SIGKILL)
        host.wait()
    if pending:
        done.append({"fault": fault, "skipped": f"{len(pending)} not injected: the writers ended first"})
    return done


def _inject(fault, server, pg, delivered, log) -> dict:
    t0 = time.monotonic()
    if fault == "server":
        server.kill()
        server.start(migrate=False)
    else:
        pg.restart()
    down = time.monotonic() - t0
    what = "killed and restarted" if fault == "server" else "restarted"
    log(f"  {fault} {what} at {delivered} epochs delivered: {down:.1f} s down")
    return {"fault": fault, "at_delivered_epochs": delivered, "seconds_down": round(down, 2)}


def _results(shape: Shape, out: Path) -> list[dict]:
    found = []
    for i in range(shape.writers):
        path = out / f"result-{i}.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
            continue
        # Killed: what its progress file says.
        progress = out / f"progress-{i}"
        run_id, offered = None, 0
        if progress.exists():
            parts = progress.read_text().split()
            offered, run_id = int(parts[2]), parts[3] if len(parts) > 3 else None
        found.append(
            {
                "writer": i,
                "run_id": run_id,
                "offered": offered,
                "finished": False,
                "latencies_ms": [],
                "error": "stopped at the deadline",
                "deferred": 0,
            }
        )
    return found


def _read_back(env: dict, results: list[dict], shape: Shape) -> dict:
    """Every run as the server has it: per writer, epochs lost and doubled; runs in the
    experiment that no writer owns (a create retried after the first one went in)."""
    os.environ.update(env)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from kd_mlflow import schema

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    lost = doubled = 0
    statuses = {}
    for r in results:
        if not r["run_id"]:
            continue
        run = client.get_run(r["run_id"])
        statuses[r["run_id"]] = run.info.status
        counts = {k: Counter(m.step for m in client.get_metric_history(r["run_id"], k)) for k in schema.EPOCH_METRICS}
        for epoch in range(1, r["offered"] + 1):
            lost += any(c[epoch] == 0 for c in counts.values())
            doubled += any(c[epoch] > 1 for c in counts.values())
        doubled += sum(1 for c in counts.values() for step in c if step > r["offered"] or step < 1)
        artifacts = {
            f.path for folder in ("weights", "predictions") for f in client.list_artifacts(r["run_id"], folder)
        }
        r["artifacts"] = sorted(artifacts)
    exp = client.get_experiment_by_name(EXPERIMENT)
    owned = {r["run_id"] for r in results}
    orphans = [
        run.info.run_id
        for run in client.search_runs([exp.experiment_id], max_results=1000)
        if run.info.run_id not in owned
    ]
    return {"lost": lost, "doubled": doubled, "statuses": statuses, "orphans": orphans}


def _figures(name, shape, results, back, faults, seconds) -> dict:
    lat = sorted(x for r in results for x in r["latencies_ms"])
    finished = [
        r
        for r in results
        if r["finished"] and back["statuses"].get(r["run_id"]) == "FINISHED" and len(r.get("artifacts", ())) == 2
    ]
    return {
        "scenario": name,
        "load_writers": shape.writers,
        "runs_per_min": round(60 * len(finished) / seconds, 1),
        "log_batch_p50_ms": round(_quantile(lat, 0.50), 1) if lat else None,
        "log_batch_p99_ms": round(_quantile(lat, 0.99), 1) if lat else None,
        "errors": sum(1 for r in results if r["error"]),
        "deferred_epochs": sum(r["deferred"] for r in results),
        "load_lost_epochs": back["lost"],
        "load_duplicated_epochs": back["doubled"],
        "orphan_runs": len(back["orphans"]),
        "all_finished": len(finished) == shape.writers,
        "writers_finished": len(finished),
        "seconds": round(seconds, 1),
        "faults": faults,
        "writer_errors": sorted({r["error"] for r in results if r["error"]}),
        "log_batch_samples": len(lat),
        "shape": asdict(shape),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return (
        statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]
        if q < 1
        else sorted_values[-1]
    )


# --- the host and its writers (child processes) -----------------------------------------


def host(spec: dict) -> int:
    """Import MLflow and kd-mlflow once, fork one writer per run, stop any past its
    deadline (SIGTERM: the run ends KILLED, as a training's would)."""
    shape, out = Shape(**spec["shape"]), Path(spec["out"])
    import numpy  # noqa: F401  (the writers' predictions; imported once, here)
    from mlflow.data.dataset_source_registry import resolve_dataset_source  # noqa: F401

    from kd_mlflow import runs, tracking  # noqa: F401

    tracking._provenance()  # the git call, once (the children inherit the cache)
    children = {}
    for i in range(shape.writers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = writer(i, shape, out)
            finally:
                os._exit(code)
        children[pid] = i
    deadline = time.monotonic() + shape.deadline
    while children:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.pop(pid, None)
            continue
        if time.monotonic() > deadline:
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            deadline += 30  # then the parent's bound of last resort
        time.sleep(0.1)
    return 0


class _Timed:
    """The writer as the sink sees it, timing each epoch's log_batch."""

    def __init__(self, writer, latencies: list, progress):
        self.writer, self.latencies, self.progress = writer, latencies, progress
        self.failed = 0

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def log_epoch(self, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        try:
            self.writer.log_epoch(*args, **kwargs)
        except Exception:
            self.failed += 1
            raise
        self.latencies.append(1000 * (time.perf_counter() - t0))
        self.progress(delivered=1)


def writer(i: int, shape: Shape, out: Path) -> int:
    """One training-shaped run through kd-mlflow's own tracking code."""
    import numpy as np

    from kd_mlflow import config, runs, schema, tracking
    from kd_mlflow.errors import verdict

    log = open(out / f"writer-{i}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    state = {"delivered": 0, "offered": 0, "run_id": ""}

    def progress(delivered=0, offered=0):
        state["delivered"] += delivered
        state["offered"] += offered
        tmp = out / f".progress-{i}"
        tmp.write_text(f"{i} {state['delivered']} {state['offered']} {state['run_id']}")
        tmp.replace(out / f"progress-{i}")

    latencies: list[float] = []
    timed = None
    result = {"writer": i, "run_id": None, "finished": False, "error": ""}
    rng = np.random.default_rng(i)
    try:
        session = tracking.connect(EXPERIMENT)
        w = tracking.RunWriter(session, None, f"load-{i}")
        state["run_id"] = result["run_id"] = w.run_id
        progress()
        recipe = config.PRESETS["smoke"]
        with runs.finishing(w):
            tags = {schema.ROLE: "train", schema.SEED: str(i), schema.PRESET: "smoke", schema.CONFIG_HASH: f"load-{i}"}
            w.log_header({**recipe.as_params(), "seed": i}, tags)
            w.log_dataset("load", "file:///load/digits", f"{i:016x}")
            timed = _Timed(w, latencies, progress)
            sink = runs.EpochSink(timed)
            for epoch in range(1, shape.epochs + 1):
                time.sleep(shape.epoch_seconds)
                progress(offered=1)
                sink(epoch, {k: float(rng.random()) for k in schema.EPOCH_METRICS})
            sink.flush()
            w.log_final({schema.FINAL_TEST_ACC: float(rng.random())})
            model = out / f"model-{i}.bin"
            model.write_bytes(rng.bytes(int(shape.model_mb * 2**20)))
            w.log_artifact(model, "weights")
            model.unlink()
            n = shape.predictions
            logits = rng.standard_normal((2 * n, 10))
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            labels, pred = rng.integers(0, 10, 2 * n), probs.argmax(1)
            w.log_predictions(probs[:n], probs[n:], labels[:n], labels[n:], pred_val=pred[:n], pred_test=pred[n:])
        result["finished"] = True
    except BaseException as e:
        result["error"] = verdict(e)[1]  # the line kd-mlflow would have ended with
        raise
    finally:
        result.update(offered=state["offered"], latencies_ms=latencies, deferred=timed.failed if timed else 0)
        (out / f"result-{i}.json").write_text(json.dumps(result))
    return 0 if result["finished"] else 1


# --- the table -------------------------------------------------------------------


COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("writers", "load_writers", "{}"),
    ("runs/min", "runs_per_min", "{:.1f}"),
    ("p50 ms", "log_batch_p50_ms", "{:.0f}"),
    ("p99 ms", "log_batch_p99_ms", "{:.0f}"),
    ("errors", "errors", "{}"),
    ("deferred", "deferred_epochs", "{}"),
    ("lost", "load_lost_epochs", "{}"),
    ("doubled", "load_duplicated_epochs", "{}"),
    ("orphans", "orphan_runs", "{}"),
    ("all finished", "all_finished", "{}"),
)


def table(figures: list[dict]) -> str:
    def cell(fmt, value):
        return "-" if value is None else fmt.format(value)

    rows = [[h for h, _, _ in COLUMNS]] + [[cell(f, fig[k]) for _, k, f in COLUMNS] for fig in figures]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = [
        "  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    ]
    for fig in figures:
        for e in fig["writer_errors"][:3]:
            lines.append(f"  {fig['scenario']}: {e}")
        if len(fig["writer_errors"]) > 3:
            lines.append(f"  {fig['scenario']}: ... {len(fig['writer_errors']) - 3} more (JSON: writer_errors)")
    return "\n".join(lines)


def bench_load(shape: Shape, names=tuple(SCENARIOS), log=print) -> dict:
    reason = unavailable_reason()
    if reason:
        log(f"load: skipped: {reason}")
        return {"load": {"skipped": reason}}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kd-load-") as tmp:
        figures = [scenario(name, shape, Path(tmp) / name, log) for name in names]
    return {"load": {"scenarios": figures, "load_average_at_start": load0, "load_average_at_end": os.getloadavg()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help=argparse.SUPPRESS)  # internal: the writers' host process
    p.add_argument("--writers", type=int, default=Shape.writers)
    p.add_argument("--epochs", type=int, default=Shape.epochs)
    p.add_argument("--network-timeout", type=float, default=0.0, help="the writers' bound, seconds [kd-mlflow's]")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.host:
        return host(json.loads(args.host))
    shape = Shape(writers=args.writers, epochs=args.epochs, network_timeout=args.network_timeout)
    res = bench_load(shape, tuple(args.scenarios.split(",")))
    if "scenarios" in res["load"]:
        print(table(res["load"]["scenarios"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
