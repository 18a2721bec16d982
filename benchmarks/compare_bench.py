"""``kd-mlflow compare`` against a real MLflow server holding many logged runs.

Runs are logged the way the study logs them (kd_mlflow/schema.py tags, the recipe
as params, per-epoch history and final metrics), in blocks of one study: five train
seeds, their ensemble, a KD student, five SD students and their ensemble. Only reading
them back is measured, so they are written fast: one ``log_batch`` per run, straight
into the server's sqlite store before the server starts (about three times faster
than through its HTTP API); the server then reads them like any runs it logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kd_mlflow import compare, runs, tracking
from kd_mlflow import schema as S
from kd_mlflow.config import PRESETS

STUDY_PRESETS = ("standard", "cpu-demo", "seed-report", "smoke")
EPOCH_METRICS = (*S.EPOCH_METRICS, "epoch_seconds")
ROOT = Path(__file__).resolve().parents[1]


def _tags(preset: str, seed: int | None, role: str, **extra) -> dict:
    r = PRESETS[preset]
    tags = {
        S.ROLE: role,
        S.PRESET: preset,
        S.DATASET: r.dataset,
        S.SPLIT_DIGEST: "0" * 16,
        S.NUM_CLASSES: "10",
        S.VERSION: "0.1.0",
        S.GIT_COMMIT: "f" * 40,
        S.DEVICE: "cuda",
        S.PRECISION_RESOLVED: "bf16",
        S.GROUP: f"bench-{preset}",  # one recipe and split per preset, as a study tags its runs
        S.GROUP_LABEL: preset,
        **extra,
    }
    if seed is not None:
        tags[S.SEED] = str(seed)
    return tags


def _metrics(epochs: int, acc: float) -> list[Metric]:
    ts = int(time.time() * 1000)
    history = [Metric(k, acc - 5 + e / epochs, ts + e, e) for e in range(1, epochs + 1) for k in EPOCH_METRICS]
    final = [
        Metric(S.FINAL_VAL_ACC, acc + 0.4, ts, 0),
        Metric(S.FINAL_TEST_ACC, acc, ts, 0),
        Metric(S.BEST_EPOCH, epochs, ts, 0),
    ]
    return history + final


def _study(preset: str, study: int) -> list[dict]:
    """One study's runs as (tags, with_history) specs; "@i" names the i-th run's id."""
    seeds = list(range(5 * study, 5 * study + 5))
    train = [{"tags": _tags(preset, s, "train", **{S.CONFIG_HASH: f"t{preset}{s}"}), "history": True} for s in seeds]
    members = ",".join(map(str, seeds))
    ens = {
        "tags": _tags(
            preset,
            None,
            "ensemble",
            **{
                S.MEMBER_ROLE: "train",
                S.MEMBER_SEEDS: members,
                S.MEMBER_RUN_IDS: "@0,@1,@2,@3,@4",
                S.CONFIG_HASH: f"e{preset}{study}",
            },
        ),
        "history": False,
    }
    kd = {
        "tags": _tags(
            preset,
            1000 + study,
            "student",
            **{
                S.METHOD: "kd",
                S.TEACHER_RUN_ID: "@5",
                S.TEACHER_ROLE: "ensemble",
                S.TEACHER_SEEDS: members,
                S.GENERATION: "1",
                S.CONFIG_HASH: f"k{preset}{study}",
            },
        ),
        "history": True,
    }
    sd = [
        {
            "tags": _tags(
                preset,
                2000 + s,
                "student",
                **{
                    S.METHOD: "sd",
                    S.TEACHER_RUN_ID: f"@{i}",
                    S.TEACHER_ROLE: "train",
                    S.TEACHER_SEEDS: str(s),
                    S.GENERATION: "1",
                    S.CONFIG_HASH: f"s{preset}{s}",
                },
            ),
            "history": True,
        }
        for i, s in enumerate(seeds)
    ]
    sd_ens = {
        "tags": _tags(
            preset,
            None,
            "ensemble",
            **{
                S.MEMBER_ROLE: "student",
                S.MEMBER_SEEDS: ",".join(str(2000 + s) for s in seeds),
                S.MEMBER_RUN_IDS: "@7,@8,@9,@10,@11",
                S.CONFIG_HASH: f"se{preset}{study}",
            },
        ),
        "history": False,
    }
    return [*train, ens, kd, *sd, sd_ens]


def _log_study(client, exp_id: str, specs: list[dict], preset: str, epochs: int, t0: int) -> None:
    created = [client.create_run(exp_id, start_time=t0 + i) for i in range(len(specs))]
    ids = [r.info.run_id for r in created]
    params = [Param(k, v) for k, v in PRESETS[preset].as_params().items()]
    for i, (run_id, spec) in enumerate(zip(ids, specs, strict=True)):
        tags = {k: _resolve(v, ids) for k, v in spec["tags"].items()}
        tags["mlflow.runName"] = f"bench-{i}"
        metrics = _metrics(epochs if spec["history"] else 0, 80.0 + i % 7)
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, "FINISHED", end_time=t0 + len(specs) + i)


def _resolve(value: str, ids: list[str]) -> str:
    if "@" not in value:
        return value
    return ",".join(ids[int(p[1:])] if p.startswith("@") else p for p in value.split(","))


def _studies(n_runs: int) -> list[tuple[str, list[dict]]]:
    """Whole studies, presets in turn, the last one cut short to make ``n_runs``."""
    out, left, k = [], n_runs, 0
    while left > 0:
        preset = STUDY_PRESETS[k % len(STUDY_PRESETS)]
        specs = _study(preset, k)[:left]  # a prefix: "@i" only ever points backwards
        out.append((preset, specs))
        left, k = left - len(specs), k + 1
    return out


def log_runs(store_uri: str, experiment: str, n_runs: int, history_epochs: int) -> str:
    """Create ``experiment`` holding ``n_runs`` FINISHED runs; returns its id. One
    thread: sqlite serialises writers anyway, and threads only add lock waits."""
    client = MlflowClient(tracking_uri=store_uri)
    # Where an experiment created through the server would keep its artifacts.
    exp_id = client.create_experiment(experiment, artifact_location=f"mlflow-artifacts:/{experiment}")
    t0 = int(time.time() * 1000)
    for j, (preset, specs) in enumerate(_studies(n_runs)):
        _log_study(client, exp_id, specs, preset, min(history_epochs, PRESETS[preset].epochs), t0 + 100 * j)
    return exp_id


# --- the two ways of running compare -----------------------------------------


def library_seconds(experiment: str, parts: dict) -> float:
    """connect + results_frame (the search, read as RunRecords) + build_tables + render,
    each part timed into ``parts``."""
    marks = [time.perf_counter()]
    session = tracking.connect(experiment, create=False)
    marks.append(time.perf_counter())
    frame = runs.results_frame(session)
    marks.append(time.perf_counter())
    tables = compare.build_tables(frame)
    marks.append(time.perf_counter())
    text = compare.render(tables, "markdown")
    marks.append(time.perf_counter())
    assert text.startswith("## "), text[:200]
    for name, a, b in zip(("connect", "results_frame", "build_tables", "render"), marks, marks[1:], strict=False):
        parts.setdefault(name, []).append(b - a)
    return marks[-1] - marks[0]


def cli_seconds(experiment: str, uri: str) -> float:
    """The whole process, interpreter start and imports included."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    t0 = time.perf_counter()
    # The tables alone (--no-intervals): the intervals read one predictions artifact per run.
    out = subprocess.run(
        [sys.executable, "-m", "kd_mlflow", "compare", "--experiment", experiment, "--no-intervals"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"kd-mlflow compare exited {out.returncode}: {out.stderr[-2000:]}")
    return seconds


def compare_arms(sizes: dict[int, str], uri: str, parts: dict) -> dict:
    arms = {}
    for n, experiment in sizes.items():
        arms[f"library_{n}"] = lambda e=experiment, n=n: library_seconds(e, parts.setdefault(n, {}))
        arms[f"cli_{n}"] = lambda e=experiment: cli_seconds(e, uri)
    return arms
