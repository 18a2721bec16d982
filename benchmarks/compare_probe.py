"""Where does ``kd-mlflow compare`` spend its time on 1,000 runs? One experiment written
the way compare_bench writes it, behind a real ``mlflow server``; each way of reading
it back is timed ``--reps`` times (median):

    rest_json      one POST runs/search per page (page size --page), JSON decoded only
    rest_page200   the same, 200 runs per page
    rest_preset    the same, filtered server-side to one preset's runs (a tag filter)
    client_pages   MlflowClient.search_runs, paged: Run entities
    search_runs    mlflow.search_runs(..., output_format="pandas"): what compare did before RunRecords
    client_frame   MlflowClient pages -> a frame of only the tags and metrics compare reads
    results_frame  runs.results_frame(): the library's call (the search, read as RunRecords)
    compare_work   compare's own work on that frame: build_tables + render (markdown),
                   and its ratio (read + work) / read: what compare adds to the read it waits on

    python benchmarks/compare_probe.py [--runs 1000] [--page 1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import compare_bench  # noqa: E402

FINISHED = "attributes.status = 'FINISHED'"


def rest_json(uri: str, exp_id: str, page: int, filter: str = FINISHED) -> int:
    import requests

    n, token = 0, None
    while True:
        body = {"experiment_ids": [exp_id], "filter": filter, "max_results": page}
        if token:
            body["page_token"] = token
        r = requests.post(f"{uri}/api/2.0/mlflow/runs/search", json=body, timeout=60).json()
        n += len(r.get("runs", []))
        token = r.get("next_page_token")
        if not token:
            return n


def client_pages(exp_id: str, page: int) -> list:
    from mlflow.tracking import MlflowClient

    client, runs, token = MlflowClient(), [], None
    while True:
        got = client.search_runs([exp_id], FINISHED, max_results=page, page_token=token)
        runs.extend(got)
        token = got.token
        if not token:
            return runs


def client_frame(exp_id: str, page: int):
    """Only the columns compare reads: tags and metrics, no params."""
    import pandas as pd

    rows = [
        {
            "run_id": r.info.run_id,
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
            **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
        }
        for r in client_pages(exp_id, page)
    ]
    return pd.DataFrame(rows)


def search_runs(exp_id: str):
    import mlflow

    return mlflow.search_runs([exp_id], filter_string=FINISHED, output_format="pandas", max_results=100_000)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--page", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from kd_mlflow import compare, runs, tracking
    from kd_mlflow import schema as S
    from tests.mlflow_server import MlflowServer

    with tempfile.TemporaryDirectory(prefix="kd-probe-") as tmp:
        root = Path(tmp) / "server"
        root.mkdir()
        t0 = time.perf_counter()
        exp_id = compare_bench.log_runs(f"sqlite:///{root / 'mlflow.db'}", "probe", args.runs, 4)
        print(f"logged {args.runs} runs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        with MlflowServer(root) as server:
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            frames: list = []  # compare_work's input: the frame results_frame read last

            def read():
                frames[:] = [runs.results_frame(tracking.connect("probe", create=False))]
                return frames[0]

            one_preset = f"{FINISHED} and tags.`{S.PRESET}` = 'cpu-demo'"
            arms = {
                "rest_json": lambda: rest_json(server.uri, exp_id, args.page),
                "rest_page200": lambda: rest_json(server.uri, exp_id, 200),
                "rest_preset": lambda: rest_json(server.uri, exp_id, args.page, one_preset),
                "client_pages": lambda: client_pages(exp_id, args.page),
                "search_runs": lambda: search_runs(exp_id),
                "client_frame": lambda: client_frame(exp_id, args.page),
                "results_frame": read,
                "compare_work": lambda: compare.render(compare.build_tables(frames[0]), "markdown"),
            }
            seconds: dict = {k: [] for k in arms}
            for rep in range(args.reps + 1):
                for name, fn in arms.items():
                    t = time.perf_counter()
                    out = fn()
                    if rep:
                        seconds[name].append(time.perf_counter() - t)
                    if rep == 1:
                        size = out if isinstance(out, int) else len(out)
                        cols = getattr(out, "shape", None)
                        print(f"{name}: {size} runs{'' if cols is None else f', frame {cols}'}", file=sys.stderr)
    res = {k: statistics.median(v) for k, v in seconds.items()}
    for k, v in res.items():
        print(f"{k:<14} {v:.3f} s")
    print(f"compare / read {1 + res['compare_work'] / res['results_frame']:.3f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"median_seconds": res, "samples": seconds, "runs": args.runs, "page": args.page}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
