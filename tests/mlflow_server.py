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


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on loopback ``port`` (Linux's /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _session_holds(session: int, inodes: set[str]) -> bool:
    """Whether a process of ``session`` (a server started with start_new_session) has one
    of these sockets open."""
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != session:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
        except OSError:  # gone, or not ours to read
            continue
    return False


class MlflowServer:
    """sqlite backend store, proxied artifacts, one worker, no job runner; ``uri`` once started."""

    def __init__(self, root: Path, port: int | None = None, extra_args=(), env=None):
        self.root, self.port, self.fixed_port = Path(root), port or free_port(), port is not None
        self.extra_args, self.env = list(extra_args), {**NO_JOBS, **(env or {})}
        self.proc, self.started = None, False
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
        """Up and answering on its port. A free port can be taken by another test's server
        between free_port() and the bind; /health would then answer from that server while
        ours exits, so the listener must be one of ours: if not, a new port, unless the port was
        given or this is a restart (same port)."""
        movable = not self.fixed_port and not self.started
        self.started = True
        for _ in range(3):
            self._start(timeout)
            if _session_holds(self.proc.pid, _listening_inodes(self.port)):
                return self
            self.kill()
            if not movable:
                break
            self.port = free_port()
            self.uri = f"http://127.0.0.1:{self.port}"
        raise RuntimeError(f"port {self.port} is answered by a server that is not ours")

    def _start(self, timeout: float) -> None:
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
