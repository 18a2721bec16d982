"""benchmarks/run.py stopped by SIGTERM (a `timeout`) left its `mlflow server` (and, in
the load group, PostgreSQL and the writers' host) running: Python's default SIGTERM ends
the process at once, no `with` block's exit runs. harness.stopped_by_signals, which
run.py's entry point runs under, makes it an exception: the services stop on the way
out, and children still alive in their own process groups are killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e

CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    sys.path[:0] = [{bench!r}, {tests!r}]
    import harness
    from mlflow_server import MlflowServer
    root = Path({root!r})
    try:
        with harness.stopped_by_signals(), MlflowServer(root / "server"):
            host = [sys.executable, "-c", "import time; time.sleep(600)", str(root)]  # a writers' host
            subprocess.Popen(host, start_new_session=True)
            print("up", flush=True)
            time.sleep(600)
    except harness.Stopped as e:
        sys.exit(e.exit_code)
    """
)


def _holding(text: str) -> list[int]:
    """Processes whose command line names ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_service_the_benchmark_started(tmp_path, signum):
    code = CHILD.format(bench=str(REPO / "benchmarks"), tests=str(REPO / "tests"), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(_holding(str(tmp_path))) >= 3  # this child, the server and the host, up
        proc.send_signal(signum)
        assert proc.wait(60) == 128 + signum
    finally:
        proc.kill()
    deadline = time.monotonic() + 10  # a killed group is reaped by init a moment later
    while _holding(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _holding(str(tmp_path)) == []
