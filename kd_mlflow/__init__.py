"""kd-mlflow: ensembles, knowledge distillation and self-distillation as tracked,
reproducible MLflow runs."""

import os
import time


def _others_runnable(samples: int = 5, pause: float = 0.002) -> float:
    """Processes other than this one ready to run right now (Linux's /proc/loadavg,
    averaged over a few readings 2 ms apart): the load this process starts beside.
    The 1-minute load average would still count a study that just ended."""
    total = 0.0
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0.0  # not Linux: no reading, OpenMP's own default
        total += max(running - 1, 0)  # the reader itself is running
        if i + 1 < samples:
            time.sleep(pause)
    return total / samples


def openmp_waits(others_runnable: float) -> dict:
    """How torch's OpenMP threads wait at a barrier, decided before torch loads (OpenMP
    reads it once) and only where the user has not chosen. Beside other runnable
    processes: PASSIVE (sleep), since a spinning thread holds a core that a parked sibling
    needs (an epoch ran 70x slower beside a dozen busy processes). On a quiet machine:
    spin 10,000 rounds first, within 2% of OpenMP's default spinning where sleeping at
    once lost 25% (benchmarks/threads_bench.py; docs/benchmarks.md). The policy changes
    no result, only speed; the thread count, which changes results, is not touched."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if others_runnable >= 0.5 else {"GOMP_SPINCOUNT": "10000"}


if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ.update(openmp_waits(_others_runnable()))

# MLflow's usage telemetry sets and unsets an environment variable from a background
# thread, while a request on another thread iterates os.environ (urllib's proxy
# lookup): seen here as `KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'` failing a run search
# on a machine that cannot reach the telemetry endpoint. Off unless the user turns it
# on; read when mlflow is imported, so set before (here: before any module imports it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _version() -> str:
    """pyproject.toml's version, the one source: as installed (the distribution's
    metadata), else read from the pyproject.toml beside a source tree that was not
    installed, else "0+unknown" (the run's kd.source_digest still names its code)."""
    from importlib import metadata
    from pathlib import Path

    try:
        return metadata.version("kd-mlflow")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib  # Python 3.11+

        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
        if project["name"] == "kd-mlflow":
            return str(project["version"])
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return "0+unknown"


def __getattr__(name: str) -> str:
    # Lazy: importlib.metadata costs ~25 ms of import, and a refused command line
    # (exit 2 before torch or MLflow loads) should not pay for a version it never prints.
    if name == "__version__":
        globals()["__version__"] = version = _version()
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
