"""How the training loop runs: the processes ``torchrun`` starts, and the
signals that stop it. (Its precision and autocast: :mod:`charnn.model.precision`.)"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def rank0_values(dist_info: DistInfo, device: torch.device, *values: float,
                 dtype: torch.dtype = torch.float64) -> list[float]:
    """Rank 0's ``values`` on every rank (the values themselves without torchrun)."""
    if not dist_info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def _env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None  # type: ignore[assignment]
    if value is None or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"the environment variable {name}={raw[:40]!r} is not a whole number {bound}; "
                          "torchrun sets it: launch with torchrun or python -m torch.distributed.run, "
                          "or unset it to train in one process")
    return value


def setup_distributed(device_name: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment."""
    world = _env_int("WORLD_SIZE", 1, 1, 1 << 16)
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0, 0, world - 1)
    local_rank = _env_int("LOCAL_RANK", 0, 0, world - 1)
    use_cuda = (device_name == "auto" or device_name.startswith("cuda")) and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE={world} is set but {name} is not: start distributed runs with "
                                  "python -m torch.distributed.run (torchrun), which sets both")
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"could not join the torchrun process group: {str(e).splitlines()[0][:200]}") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


class StopSignals:
    """The first Ctrl-C, SIGTERM (timeout, docker stop, Slurm) or SIGHUP (a
    closed terminal) asks the loop to save and stop at the next step boundary;
    a second one interrupts at once (the last checkpoint is intact: writes are
    atomic)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def hit(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
