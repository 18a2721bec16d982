"""Atomic, checksummed checkpoints that load without executing pickle code: kept on
local disk each epoch, and copied to the run's artifact store (:class:`Cadence`) so that
a rerun on another machine continues the run.

File layout: ``MAGIC`` (8 bytes) + sha256 of the payload (32 bytes) + payload, where the
payload is ``torch.save`` output read back with ``weights_only=True`` (tensors,
numbers, strings and containers only: a planted pickle payload is refused, never run).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .errors import TrackingRefused, TrackingUnavailable

MAGIC = b"KDCKPT01"
EVERY_ENV = "KD_MLFLOW_CHECKPOINT_EVERY"
SLOTS = ("slot-0.ckpt", "slot-1.ckpt")  # on the server: the latest and the one before


class CorruptCheckpoint(Exception):
    pass


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old file or the
    new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: the message names the file (a write's error does not)
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)


def dump(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def parse(data: bytes, name: str = "checkpoint"):
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{name}: not a kd-mlflow checkpoint (truncated or foreign)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint(f"{name}: checksum mismatch (truncated or corrupted)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:  # weights_only refuses anything
        # but plain data; a damaged archive fails as RuntimeError
        raise CorruptCheckpoint(f"{name}: refused to load ({type(e).__name__})") from None


@dataclass(frozen=True)
class Cadence:
    """How often a checkpoint is copied to the server: every ``epochs`` epochs, or
    (``minutes`` > 0) at the first epoch's end ``minutes`` after the last copy; never
    when both are 0. The local copy is written every epoch whatever this says."""

    epochs: int = 1
    minutes: float = 0.0

    def due(self, epoch: int, since_last: float) -> bool:
        if self.minutes > 0:
            return since_last >= 60 * self.minutes
        return self.epochs > 0 and epoch % self.epochs == 0


def cadence(text: str | None = None) -> Cadence:
    """``$KD_MLFLOW_CHECKPOINT_EVERY``: ``N`` (epochs; 0: never), or ``Nm`` (minutes)."""
    text = (os.environ.get(EVERY_ENV, "") if text is None else text).strip()
    if not text:
        return Cadence()
    minutes = text.endswith("m")
    number = text[:-1] if minutes else text
    try:
        value = float(number) if minutes else int(number)
    except ValueError:
        value = -1
    if not (0 <= value < float("inf")) or (minutes and value == 0):
        raise ConfigError(EVERY_ENV, text, "a number of epochs >= 0 (0: never), or of minutes > 0 such as 30m")
    return Cadence(0, float(value)) if minutes else Cadence(int(value))


class CheckpointStore:
    """Per-epoch checkpoints of one training, newest ``keep`` kept on disk. They record the
    runs they belong to (:meth:`bind`), beside them and in each checkpoint: a rerun
    continues those runs only.

    With ``remote`` (:class:`kd_mlflow.tracking.ServerCheckpoints`), a checkpoint is also
    copied to the server at the ``every`` cadence, as an artifact of the first of its runs
    (by configuration hash: a packed wave's one checkpoint covers all its runs), in two
    slots used in turn: a copy cut short (a kill mid-upload) fails its checksum and the
    other slot is read instead."""

    OWNERS = "runs.json"

    def __init__(self, directory: Path, keep: int = 2, log=sys.stderr, remote=None, every: Cadence = Cadence()):
        self.directory, self.keep, self.log = Path(directory), keep, log
        self.owners: dict[str, str] = {}
        self.remote, self.every = remote, every
        self.slot, self.uploaded_at = 0, time.monotonic()  # the server slot written next

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("epoch-*.ckpt"))

    def bind(self, owners: dict[str, str]) -> None:
        """The runs the checkpoints saved from now on belong to: {config hash: run id}."""
        self.owners = dict(owners)
        write_atomic(self.directory / self.OWNERS, json.dumps(self.owners, sort_keys=True).encode())

    def owners_on_disk(self) -> dict[str, str]:
        """{config hash: run id} of the checkpoints on disk; {} if they record none."""
        try:
            owners = json.loads((self.directory / self.OWNERS).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in owners.items()} if isinstance(owners, dict) else {}

    def save(self, state: dict) -> Path:
        path = self.directory / f"epoch-{state['epoch']:05d}.ckpt"
        write_atomic(path, dump({**state, "run_ids": self.owners} if self.owners else state))
        for old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        if self.remote is not None and self.owners and self.every.due(state["epoch"], self._since_upload()):
            self._upload(path)
        return path

    def _since_upload(self) -> float:
        return time.monotonic() - self.uploaded_at

    def _keeper(self, owners: dict[str, str]) -> str:
        """The run whose artifacts hold the checkpoint of ``owners``."""
        return owners[min(owners)]

    def _upload(self, path: Path) -> None:
        try:
            self.remote.upload(self._keeper(self.owners), path, SLOTS[self.slot])
        except (TrackingUnavailable, TrackingRefused, OSError) as e:
            print(f"warning: checkpoint kept here only, training goes on: {e}", file=self.log)
            return
        self.slot, self.uploaded_at = 1 - self.slot, time.monotonic()

    def pull(self, owners: dict[str, str]) -> bool:
        """Whether a checkpoint of the runs ``owners`` ({config hash: run id}) is here now:
        the server's newest one that verifies and belongs to them is fetched first, when it
        is newer than the newest one on local disk (kept, and preferred, otherwise)."""
        found = self._newest_on_server(owners) if self.remote is not None else None
        if found is None:
            return self.exists()
        epoch, slot, data = found
        self.slot = 1 - slot  # the next upload leaves the newest copy alone
        local = self._files()
        if local and int(local[-1].stem.split("-")[1]) >= epoch:
            return True
        print(f"fetched the checkpoint of epoch {epoch} from the tracking server", file=self.log)
        write_atomic(self.directory / f"epoch-{epoch:05d}.ckpt", data)
        return True

    def _newest_on_server(self, owners: dict[str, str]):
        """(epoch, slot, bytes) of the newest server checkpoint of ``owners``, or None."""
        keeper, best = self._keeper(owners), None
        for path in self.remote.download(keeper):
            data, name = path.read_bytes(), f"{path.name} of run {keeper} on the tracking server"
            try:
                state = parse(data, name)
            except CorruptCheckpoint as e:
                print(f"warning: skipping checkpoint {e}", file=self.log)
                continue
            if state.get("run_ids") != owners:
                print(
                    f"warning: skipping checkpoint {name}: it belongs to run(s) {state.get('run_ids')}", file=self.log
                )
                continue
            if path.name in SLOTS and (best is None or state["epoch"] > best[0]):
                best = (state["epoch"], SLOTS.index(path.name), data)
        return best

    def finish(self) -> None:
        """The runs are finished: their checkpoints go, here and on the server (a copy the
        server keeps is only storage: a finished run is never continued)."""
        if self.remote is not None and self.owners:
            try:
                self.remote.delete(self._keeper(self.owners))
            except (TrackingUnavailable, TrackingRefused, OSError) as e:
                print(f"warning: the run's checkpoint stays on the server: {e}", file=self.log)
        self.clear()

    def exists(self) -> bool:
        return bool(self._files())

    def load_latest(self):
        """The newest checkpoint that verifies; corrupted ones are reported in one line
        each and skipped, falling back to an older one or to a clean start."""
        for path in reversed(self._files()):
            try:
                state = parse(path.read_bytes(), str(path))
            except CorruptCheckpoint as e:
                print(f"warning: skipping checkpoint {e}", file=self.log)
                continue
            if self.owners and state.get("run_ids") != self.owners:
                owners = state.get("run_ids")
                print(f"warning: skipping checkpoint {path}: it belongs to run(s) {owners}", file=self.log)
                continue
            return state
        return None

    def clear(self) -> None:
        for path in self._files():
            path.unlink(missing_ok=True)
        (self.directory / self.OWNERS).unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
