"""Where models run: the device by name, and what the CPU can do."""

from __future__ import annotations

import functools
import os

import torch

from .errors import ConfigError


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps asked for, but MPS is not available; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Threads for torch's CPU kernels when the user does not say.

    OpenMP threads spin while they wait for each other: when another process
    holds a core, a second thread stalls every step (4.5-23x slower measured on
    2 shared cores). So use only the cores that are idle now, judged by the
    1-minute load average, and never more than 4 (the small matrices of a
    char-level model gain little beyond that).
    """
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    idle = int(cores - load + 0.5)
    return max(1, min(idle, cores, 4))


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count: ``requested`` when given, else
    :func:`default_threads`. Returns the count in effect."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"--threads must be a positive whole number, got {requested!r}")
    n = requested if requested is not None else default_threads()
    torch.set_num_threads(n)
    return n
