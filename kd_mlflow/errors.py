"""Errors that cross module boundaries, and the one place that decides what a failed
command says and how it exits (:func:`verdict`).

The rule: 2 for what the user typed or pointed at (values, paths, run ids, experiments,
devices), 1 for the environment (the tracking server, the network, a full disk), 128 +
the signal's number for SIGINT and SIGTERM. Every message is one complete line: the
cause's first line, never cut mid-word, and what to do. No MLflow, torch or click here.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import signal
import tarfile
import zipfile
import zlib

USER = 2  # what the user typed or pointed at
ENVIRONMENT = 1  # the tracking server, the network, the disk
LIMIT = 400  # characters a quoted cause may take in a one-line message


class TrackingUnavailable(Exception):
    """The tracking server did not answer, or answered only with server errors (exit 1)."""


class TrackingRefused(Exception):
    """The tracking server refused the credentials or the permission (exit 1)."""


class DataUnavailable(Exception):
    """A dataset could not be had from the network (exit 1); a path the user gave that
    holds no usable data is a :class:`kd_mlflow.config.ConfigError` instead."""


class MissingExtra(Exception):
    """An optional dependency that a valid request needs is not installed (exit 1: the
    environment lacks it; nothing the user typed is wrong)."""

    def __init__(self, extra: str, wanted_by: str):
        super().__init__(f"{wanted_by} needs {extra}, which is not installed: pip install 'kd-mlflow[{extra}]'")


class GaveUp(BaseException):
    """A wait on the network reached its bound (:mod:`kd_mlflow.waits`). A BaseException,
    so that no library's ``except Exception`` swallows it on its way out of the wait."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"no answer from {what} within {seconds:g} s")
        self.what, self.seconds = what, seconds


class Interrupted(BaseException):
    """SIGTERM or SIGINT: exits 128 + signum. A BaseException, as KeyboardInterrupt is."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class StepFailed(Exception):
    """A study's step ended without a result; the study names it. Exits as the step did
    (2 if it refused its input, else 1)."""

    def __init__(self, step: str, reason: str, code: int = ENVIRONMENT):
        super().__init__(f"step {step} failed: {reason}")
        self.code = code if code in (USER, ENVIRONMENT) else ENVIRONMENT


# --- what was done on the way out ---------------------------------------------------


def note_done(e: BaseException, what: str) -> None:
    """Record on ``e`` something done while it travelled up (a run marked KILLED, a
    checkpoint kept): the last message then says only what is true."""
    done = getattr(e, "kd_done", None)
    if done is None:
        done = []
        try:
            e.kd_done = done  # type: ignore[attr-defined]
        except AttributeError:
            return
    if what not in done:
        done.append(what)


def done(e: BaseException) -> list[str]:
    return list(getattr(e, "kd_done", ()))


# --- one line ------------------------------------------------------------------------


def one_line(text: str, limit: int = LIMIT) -> str:
    """The first non-empty line of ``text``, whitespace folded, at most ``limit``
    characters, cut between words (marked "..."); inside the first word only when that
    word alone is longer than ``limit`` (a long path or URL)."""
    first = next((line for line in str(text).splitlines() if line.strip()), "")
    first = " ".join(first.split())
    if len(first) <= limit:
        return first
    head = first[: limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else first[:limit]
    return cut.rstrip(",;:(") + " ..."


def cause(e: BaseException) -> str:
    """An exception as one line: its message, or its type's name when it has none."""
    return one_line(str(e)) or type(e).__name__


# --- the verdict ---------------------------------------------------------------------

# An OSError from these is the machine's state, not a path the user gave.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EFBIG, errno.EMFILE, errno.ENFILE}
_TRACKING_MODULES = ("mlflow", "requests", "urllib3", "sqlalchemy")


def verdict(e: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that ended a command."""
    from .config import ConfigError

    if isinstance(e, KeyboardInterrupt):
        return _interrupted(signal.SIGINT, e)
    if isinstance(e, Interrupted):
        return _interrupted(e.signum, e)
    if isinstance(e, ConfigError):
        return USER, f"error: {e}"
    if isinstance(e, StepFailed):
        return e.code, f"error: {cause(e)}"
    if isinstance(e, TrackingRefused):
        return ENVIRONMENT, f"error: {cause(e)}"
    if isinstance(e, (TrackingUnavailable, DataUnavailable, MissingExtra)):
        return ENVIRONMENT, f"error: {cause(e)}"
    if isinstance(e, GaveUp):
        return ENVIRONMENT, f"error: {cause(e)}; raise --network-timeout (KD_MLFLOW_NETWORK_TIMEOUT) or try later"
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ENVIRONMENT, f"error: out of memory ({cause(e)}); try a smaller --batch-size or --eval-batch-size"
    if type(e).__module__.split(".")[0] in _TRACKING_MODULES:
        return ENVIRONMENT, f"error: tracking server: {cause(e)}"
    return ENVIRONMENT, (
        f"internal error: {type(e).__name__}: {cause(e)} (a bug in kd-mlflow; KD_MLFLOW_TRACEBACK=1 shows where)"
    )


def _interrupted(signum: int, e: BaseException) -> tuple[int, str]:
    name = signal.Signals(signum).name
    what = done(e)
    tail = "; ".join(what) if what else "no run was changed"
    return 128 + signum, f"interrupted ({name}); {tail}"


def _os_error(e: OSError) -> tuple[int, str]:
    where = f" {e.filename}" if e.filename else ""
    why = e.strerror or cause(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ENVIRONMENT, (
            f"error: cannot write{where}: {why}: free some space, or point --cache-dir ($KD_MLFLOW_CACHE) "
            "or --output at another disk"
        )
    if e.errno in _ENVIRONMENT_ERRNOS or not e.filename:
        return ENVIRONMENT, f"error: {why}{(' (' + str(e.filename) + ')') if e.filename else ''}"
    return USER, f"error: {e.filename}: {why}"


# What reading a damaged archive raises: a truncated stream (EOFError), bad compressed
# bytes (zlib, lzma), a bad gzip header, a bad tar header or member, a bad zip (its
# directory, a CRC).
_ARCHIVE_DAMAGE = (EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def damaged_archive(e: BaseException) -> bool:
    """Whether an archive failed to unpack on its own bytes (truncated or corrupt: the
    file is at fault), not on the machine (a full disk is an OSError with an errno)."""
    if isinstance(e, _ARCHIVE_DAMAGE):
        return True
    return type(e) is OSError and e.errno is None  # bz2's "Invalid data stream"


def traceback_wanted() -> bool:
    """KD_MLFLOW_TRACEBACK=1: an internal error shows its traceback (for a bug report)."""
    return os.environ.get("KD_MLFLOW_TRACEBACK", "") not in ("", "0")
