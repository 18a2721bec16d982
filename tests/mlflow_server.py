"""Start a real `mlflow server` subprocess on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# MLflow 3's server starts a job runner and a pool of Huey consumers (GenAI jobs) beside
# itself: about ten Python processes that kd-mlflow never uses, which on a 2-core machine
# compete with the training under test. A test server runs without them.
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """sqlite backend store, proxied artifacts, one worker, no job runner; ``uri`` once started."""

    def __init__(self, root: Path, port: int | None = None, extra_args=(), env=None):
        self.root, self.port = Path(root), port or free_port()
        self.extra_args, self.env = list(extra_args), {**NO_JOBS, **(env or {})}
        self.proc = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
            *self.extra_args,
        ]

    def start(self, timeout: float = 90.0) -> MlflowServer:
        log = (
            open(self.root.parent / f"mlflow-server-{self.port}.log", "ab")
            if self.root.parent.exists()
            else subprocess.DEVNULL
        )
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        try:
            self._wait_until_up(timeout)
        except BaseException:  # not up in time, or interrupted while starting: no server left behind
            self.kill()
            raise
        return self

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL to the server and its workers at once: no handler runs, requests in
        flight are cut (a crash, an OOM kill). ``start()`` brings it back on the same port."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
