"""Where models run: the device by name, and what the CPU can do."""

from __future__ import annotations

import functools
import os
import time

import torch

from ..errors import ConfigError


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tiles, where bf16 products are several
    times as fast as fp32's (AVX512-BF16 alone is not faster than fp32)."""
    return "amx_bf16" in _cpu_flags()


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` as a torch device,
    with a clear error when it is not there."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("--device mps asked for, but MPS is not available; use --device cpu")
        return torch.device("mps")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N (such as cuda:1) or mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    if not index:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        have = "1 CUDA GPU (cuda:0)" if count == 1 else f"{count} CUDA GPUs (cuda:0 to cuda:{count - 1})"
        raise ConfigError(f"--device {name} asked for, but this machine has {have}")
    return torch.device("cuda", int(index))


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_cores(window: float = 0.25) -> float:
    """How many of the machine's cores other work keeps busy now: measured
    over ``window`` seconds from /proc/stat (immediate, unlike the load
    average, which takes a minute to follow a change); the 1-minute load
    average where /proc/stat is missing."""
    before = _cpu_times()
    if before is not None:
        time.sleep(window)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            share = (after[0] - before[0]) / (after[1] - before[1])
            return share * (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _env_count(name: str) -> int | None:
    """A positive whole number from the environment, else None."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


# The most threads charnn chooses by itself: the small matrices of a
# char-level model gain little beyond it.
MOST_AUTO_THREADS = 4


def max_threads(cores: int) -> int:
    """Beyond this many threads OpenMP only thrashes (and 100,000 crash it)."""
    return max(8, 4 * cores)


def default_threads() -> int:
    """Threads for torch's CPU kernels when the user does not say.

    OMP_NUM_THREADS, where set, is the user's choice (torchrun sets it to 1
    for each rank unless told otherwise). Otherwise: OpenMP threads wait for
    each other at every operation, so when another process holds a core a
    second thread stalls every step (4.5-23x slower measured on 2 shared
    cores). So use only the cores that are idle now, shared among the ranks
    of a distributed run on this machine (LOCAL_WORLD_SIZE: two ranks of two
    threads each on 2 cores stalled for 3 s every few steps, 85 steps in
    20 s where one thread each made 1,201), and never more than 4 (the small
    matrices of a char-level model gain little beyond that). Measured by
    benchmarks/bench_threads.py (benchmarks/README.md, "Threads").
    """
    cores = available_cores()
    given = _env_count("OMP_NUM_THREADS")
    if given is not None:
        return min(given, max_threads(cores))
    ranks = _env_count("LOCAL_WORLD_SIZE") or 1
    idle = int((cores - busy_cores()) / ranks + 0.5)
    return max(1, min(idle, cores // ranks, MOST_AUTO_THREADS))


def threads_left_open(requested: int | None) -> bool:
    """Whether charnn chooses the thread count (neither --threads nor
    OMP_NUM_THREADS says it, and torchrun's ranks do not share the cores by
    LOCAL_WORLD_SIZE), so a training run may change it as the machine's load
    changes (:mod:`charnn.training.threads`)."""
    return requested is None and _env_count("OMP_NUM_THREADS") is None and _env_count("LOCAL_WORLD_SIZE") is None


def most_auto_threads() -> int:
    """The most threads charnn chooses by itself on this machine."""
    return max(1, min(available_cores(), MOST_AUTO_THREADS))


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count: ``requested`` when given, else
    :func:`default_threads`. Returns the count in effect."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"--threads must be a positive whole number, got {requested!r}")
        cores = available_cores()
        most = max_threads(cores)
        if requested > most:
            raise ConfigError(f"--threads {requested} is far more than the {cores} core{'' if cores == 1 else 's'} "
                              f"this process may use; pass at most {most} (or leave it out: charnn picks the "
                              "idle cores)")
    n = requested if requested is not None else default_threads()
    torch.set_num_threads(n)
    return n
