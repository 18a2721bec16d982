"""What a run's numbers depend on beyond its recipe: the machine and the libraries.

Two runs of one recipe agree bit for bit only on the same CPU capability (the kernels
torch dispatches to), the same torch, CUDA and cuDNN, the same GPU, the same TF32
switches and the same thread count. :func:`env_tags` records them as strings for
tags; no MLflow here.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .schema import ENV_PREFIX


def env_tags(device: torch.device | str | None = None) -> dict[str, str]:
    """Flat ``{"kd.env.<name>": str}`` for the current process (read the TF32 switches
    after :func:`kd_mlflow.train.make_runtime` has set them)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none",
        "tf32_matmul": str(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": str(torch.backends.cudnn.allow_tf32),
        "threads": str(torch.get_num_threads()),
        # Speed only, never results: a training at nice 15 (Ray's default for its
        # workers) gets a CPU only when nothing else wants it.
        "nice": str(os.nice(0)),
        "openmp_waits": openmp_waits(),
    }
    return {ENV_PREFIX + k: (v or "unknown") for k, v in env.items()}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's word."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_said = False


def busy_note() -> str | None:
    """Once per process, on a busy machine (a load average of at least its CPUs) where the
    user has not chosen the thread count: one line saying how torch's threads wait. They
    keep torch's count (one per core: a count that followed the load would change
    results, and measured slower than passive threads); how they wait at barriers was
    decided before torch loaded (:func:`kd_mlflow.openmp_waits`)."""
    global _said
    cpus, load = _cpus(), _load()
    if _said or load < cpus or os.environ.get("KD_MLFLOW_THREADS"):  # chosen: nothing to say
        return None
    _said = True
    return thread_note(cpus, load, torch.get_num_threads(), openmp_waits())


def openmp_waits() -> str:
    """How OpenMP's threads wait, as the environment says (kd_mlflow/__init__.py chose it
    where the user did not)."""
    said = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return ", ".join(said) or "OpenMP's default"


def thread_note(cpus: int, load: float, threads: int, policy: str) -> str:
    return (
        f"note: the machine is busy (load {load:.1f} on {cpus} CPUs): {threads} torch thread(s), "
        f"{policy}; set KD_MLFLOW_THREADS or OMP_WAIT_POLICY to choose"
    )


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the CPUs this process may use
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not available (Windows): taken as idle
        return 0.0


# /proc/cpuinfo flags of the instructions that compute bfloat16 natively: without them
# torch emulates bf16 and autocast is slower than float32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX): the one
    capability probe precision=auto reads (tests mock it). Not Linux: no."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_FLAGS)


def check_device(name: str) -> None:
    """Refuse a device this machine does not have, before any run exists (one line
    naming it, exit 2), instead of failing inside a run that was already created."""
    from .config import ConfigError

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError("device", name, "not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else ", a build without CUDA"
            why = f"CUDA is not available on this machine (torch {torch.__version__}{built}); use cpu or auto"
            raise ConfigError("device", name, why)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError("device", name, f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device", name, "MPS is not available on this machine; use cpu or auto")
    elif dev.type != "cpu":
        raise ConfigError("device", name, "not a training device here: use auto, cpu, cuda, cuda:N or mps")
