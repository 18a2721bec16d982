"""Every wait on the network has a bound and a voice.

A wait that has lasted ``VOICE_AFTER`` seconds says on stderr what it waits for, and
again every ``VOICE_AFTER`` seconds (with a download's progress where there is one). It
gives up at the bound: ``--network-timeout``, else ``$KD_MLFLOW_NETWORK_TIMEOUT``, else
``DEFAULT_TIMEOUT`` seconds. A request to the tracking server is bounded as a whole
(``deadline=True``: on the main thread an alarm ends it, whatever retries the client has
left); a transfer (an artifact, a dataset) is bounded per stall: it gives up when no byte
has moved for that long, however long it takes in all. No MLflow here.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import GaveUp

ENV = "KD_MLFLOW_NETWORK_TIMEOUT"
# Seconds: a request to the tracking server, or a stalled transfer. Two restarts of a
# 4-worker server in a row kept writers away for over 60 s under load
# (benchmarks/load.py: 8 of 32 gave up at 60, none at 120).
DEFAULT_TIMEOUT = 120.0
VOICE_AFTER = 10.0  # seconds of waiting before a wait says what it waits for


def timeout() -> float:
    """The bound, in seconds (``$KD_MLFLOW_NETWORK_TIMEOUT``, else the default)."""
    return seconds_from_env(ENV, DEFAULT_TIMEOUT)


def seconds_from_env(name: str, default: float) -> float:
    """A number of seconds > 0 from the environment variable ``name``, else ``default``;
    anything else is refused naming the variable (the network bound, the claims' lease)."""
    from .config import ConfigError

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(name, text, "a number of seconds > 0")
    return value


def set_timeout(seconds: float | None) -> None:
    """``--network-timeout``: for this process and the step processes it starts."""
    if seconds is not None:
        os.environ[ENV] = f"{seconds:g}"


# --- the voice -------------------------------------------------------------------------


@dataclass
class _Wait:
    what: str
    bound: float
    started: float = field(default_factory=time.monotonic)
    progress: Callable[[], str] | None = None
    deadline: bool = True
    next_say: float = 0.0

    def line(self, now: float) -> str:
        extra = ""
        if self.progress is not None:
            with contextlib.suppress(Exception):  # a progress reading must never break the wait
                extra = f", {self.progress()}"
        limit = f"gives up at {self.bound:g} s" if self.deadline else f"gives up after {self.bound:g} s without a byte"
        return f"waiting for {self.what} ({now - self.started:.0f} s so far{extra}; {limit}) ..."


class _Voice:
    """One daemon thread that speaks for every wait that has gone on too long."""

    def __init__(self):
        self.cond = threading.Condition()
        self.waits: dict[int, _Wait] = {}
        self.thread: threading.Thread | None = None
        self.serial = 0

    def add(self, wait: _Wait) -> int:
        with self.cond:
            self.serial += 1
            wait.next_say = wait.started + VOICE_AFTER
            self.waits[self.serial] = wait
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="kd-mlflow-voice", daemon=True)
                self.thread.start()
            self.cond.notify()
            return self.serial

    def remove(self, key: int) -> None:
        with self.cond:
            self.waits.pop(key, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                lines = []
                for w in self.waits.values():
                    if now >= w.next_say:
                        lines.append(w.line(now))
                        w.next_say = now + VOICE_AFTER
                pause = min((w.next_say for w in self.waits.values()), default=now + 3600) - now
            for line in lines:
                print(line, file=sys.stderr, flush=True)
            with self.cond:
                self.cond.wait(timeout=max(0.05, pause))


_VOICE = _Voice()


# --- the bound ---------------------------------------------------------------------


def _arm(what: str, seconds: float):
    """An alarm that ends the wait at its bound: only on the main thread (where signal
    handlers run), and only for the outermost wait. Returns how to disarm it, or None."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return None
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None  # an outer wait, or someone else, holds the alarm

    def ring(signum, frame):
        raise GaveUp(what, seconds)

    try:
        previous = signal.signal(signal.SIGALRM, ring)
    except ValueError:
        return None
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return disarm


@contextlib.contextmanager
def waiting(what: str, *, deadline: bool = True, progress: Callable[[], str] | None = None, bound: float | None = None):
    """Around one wait on the network: speaks after ``VOICE_AFTER`` seconds; with
    ``deadline``, raises :class:`~kd_mlflow.errors.GaveUp` at the bound (a transfer
    bounds its stalls itself, through its socket timeout)."""
    bound = timeout() if bound is None else bound
    key = _VOICE.add(_Wait(what, bound, progress=progress, deadline=deadline))
    disarm = _arm(what, bound) if deadline else None
    try:
        yield bound
    finally:
        if disarm is not None:
            disarm()
        _VOICE.remove(key)
