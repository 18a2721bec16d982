"""Local, atomic, checksummed checkpoints that load without executing pickle code.

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
from pathlib import Path

import torch

MAGIC = b"KDCKPT01"


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


class CheckpointStore:
    """Per-epoch checkpoints of one training, newest ``keep`` kept on disk. They record the
    runs they belong to (:meth:`bind`), beside them and in each checkpoint: a rerun
    continues those runs only."""

    OWNERS = "runs.json"

    def __init__(self, directory: Path, keep: int = 2, log=sys.stderr):
        self.directory, self.keep, self.log = Path(directory), keep, log
        self.owners: dict[str, str] = {}

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
        return path

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
