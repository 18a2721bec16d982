"""kd-mlflow: ensembles, knowledge distillation and self-distillation as tracked,
reproducible MLflow runs."""

import os

# OpenMP reads its wait policy once, when torch loads it, so it is set here, before any
# import of torch. PASSIVE: a thread that waits at a barrier sleeps instead of spinning
# on a core that a parked sibling needs; beside busy processes a spinning step of
# cpu-converge's network ran 20x slower (README, "Threads on a shared machine").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
