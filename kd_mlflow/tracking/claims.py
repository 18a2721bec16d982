"""Claims: one process makes a configuration's run, across machines (:func:`claimed`),
held as a registered model of the tracking server, with a lease and a heartbeat."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import waits
from ..errors import TrackingRefused, TrackingUnavailable
from .server import Session

CLAIM_LEASE_ENV = "KD_MLFLOW_CLAIM_LEASE"
DEFAULT_LEASE = 60.0  # seconds without a heartbeat before a claim is taken over
CLAIM_PREFIX = "kd-mlflow-claim"


def lease() -> float:
    """The claims' lease, in seconds (``$KD_MLFLOW_CLAIM_LEASE``, else the default)."""
    return waits.seconds_from_env(CLAIM_LEASE_ENV, DEFAULT_LEASE)


@contextlib.contextmanager
def claimed(session: Session, key: str, what: str, running=lambda: None):
    """Hold the claim on ``key`` (a configuration hash) in the session's experiment while
    the block runs: one process at a time, on any machine that shares the tracking
    server, makes ``what``. A second process waits here, saying for whom (``running()``:
    the run the holder is writing, if it can be found), until the claim is released or
    goes stale; then it enters, and must look again for the result before making it.

    Why the claim is atomic: it is a registered model named
    ``kd-mlflow-claim-<experiment id>-<key>-<generation>``. The MLflow REST API has no
    compare-and-set on tags or params, but a registered model's name is its primary key
    in the server's database: of two ``create_registered_model`` calls with one name,
    the server commits one and answers the other RESOURCE_ALREADY_EXISTS, whichever
    machine sent it (tests/test_concurrent.py races them on a real server).

    Lease and heartbeat: the holder's thread sets the claim's tag ``beat`` to a new value
    every quarter lease (``$KD_MLFLOW_CLAIM_LEASE`` seconds, default 60). A waiter that
    sees the beat unchanged for a whole lease, by its own clock (so clocks need not
    agree), or on its own machine sees the holder's pid gone, takes over by creating the
    next generation (atomic in the same way: of two takers one wins); the run the dead
    holder left unfinished is then resumed or superseded as any unfinished run is. The
    holder deletes its claim (and the stale ones it took over) when the block ends, on
    success, failure or a signal; a holder killed with -9 leaves it to its lease."""
    base = f"{CLAIM_PREFIX}-{session.experiment_id}-{key}"
    name, below = _acquire(session, base, what, running)
    beat = _Heartbeat(name, lease() / 4)
    try:
        yield
    finally:
        beat.stop()
        for stale in [name, *below]:  # from the top: the generations left stay a prefix
            with contextlib.suppress(MlflowException, TrackingUnavailable, TrackingRefused):
                session.client.delete_registered_model(stale)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "beat": "0"}


def _acquire(session: Session, base: str, what: str, running) -> tuple[str, list[str]]:
    """(the claim's name, the stale generations below it), once this process holds it."""
    seen: dict[str, tuple[str, float]] = {}  # claim name: (its beat, when this process saw it change)
    told = False
    while True:
        found = session.client.search_registered_models(f"name LIKE '{base}-%'")
        held = {int(m.name.rsplit("-", 1)[1]): m for m in found if m.name.rsplit("-", 1)[1].isdigit()}
        top = held[max(held)] if held else None
        gone = _gone(top, seen) if top is not None else ""
        if top is not None and not gone:
            if not told:
                who = f"{top.tags.get('host', '?')}, pid {top.tags.get('pid', '?')}"
                run = running()
                print(
                    f"another process ({who}) is making {top.description or what}"
                    + (f" (run {run})" if run else "")
                    + f"; waiting (it is taken over if its heartbeat stops for {lease():g} s)",
                    file=sys.stderr,
                )
                told = True
            time.sleep(min(1.0, lease() / 4))
            continue
        if top is not None:
            print(f"note: the claim on {what} ({top.name}) is stale ({gone}): taking it over", file=sys.stderr)
        name = f"{base}-{max(held) + 1 if held else 0}"
        try:
            session.client.create_registered_model(name, tags=_holder(), description=what)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            continue  # another process got there first: wait for it
        return name, [m.name for _, m in sorted(held.items(), reverse=True)]


def _gone(claim, seen: dict) -> str:
    """Why the claim's holder is gone ("" while it is not): on this machine, its process
    has exited; on any, its beat has not changed for a lease of this process's watching."""
    tags = claim.tags or {}
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        try:
            os.kill(int(tags["pid"]), 0)
        except ProcessLookupError:
            return f"its process {tags['pid']} on this machine has exited"
        except PermissionError:
            pass  # another user's process: alive
    now = time.monotonic()
    beat = tags.get("beat", "")
    if claim.name not in seen or seen[claim.name][0] != beat:
        seen[claim.name] = (beat, now)
        return ""
    return f"no heartbeat for {lease():g} s" if now - seen[claim.name][1] > lease() else ""


class _Heartbeat:
    """A daemon thread that renews a claim every ``every`` seconds. A beat that fails
    (the server is restarting) is left to the next: the lease is four beats long."""

    def __init__(self, name: str, every: float):
        self.name, self.every = name, every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="kd-mlflow-claim", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        client = MlflowClient()
        n = 0
        while not self.done.wait(self.every):
            n += 1
            with contextlib.suppress(Exception):  # a missed beat must never stop the work
                client.set_registered_model_tag(self.name, "beat", str(n))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=1)
