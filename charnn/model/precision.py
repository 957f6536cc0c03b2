"""The precision a model runs in while it trains or scores: fp32, bf16 or
fp16 autocast, and the kernels that work for it on this device."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ConfigError
from .devices import cpu_has_amx, cpu_has_bf16

AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_precision(name: str, device: torch.device) -> str:
    """The autocast precision a model trains in: fp32 | bf16 | fp16 for this
    device. ``auto`` picks the fastest that trains as well as fp32 by what
    the device has: bf16 or fp16 on CUDA, bf16 on a CPU with AMX, fp32 on
    other CPUs (AVX512-BF16 alone made training slower, not faster;
    docs/training.md). A --time-limit run times it instead where it is in
    doubt (:func:`charnn.training.choices.choose_precision`)."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_amx():
            return "bf16"
        return "fp32"
    if name not in AUTOCAST_DTYPE:
        raise ConfigError(f"unknown precision {name!r}; choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")
    return name


def emulated_bf16(device: torch.device, precision: str) -> bool:
    """bf16 asked for on a CPU without native bf16 (no AVX512-BF16/AMX)."""
    return precision == "bf16" and device.type == "cpu" and not cpu_has_bf16()


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for one forward pass (nothing for fp32).

    On a CPU without native bf16, oneDNN has no bf16 LSTM kernel and refuses
    ("could not create a primitive descriptor"); torch's own kernels then run
    the step instead. Slower than fp32 there, but a run started in bf16 on
    another machine resumes exactly.
    """
    dtype = AUTOCAST_DTYPE[precision]
    if dtype is None:
        yield
        return
    with kernels_for(device, precision), torch.autocast(device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def kernels_for(device: torch.device, precision: str) -> Iterator[None]:
    """The kernel choice of :func:`autocast` without autocast itself (for
    code that enters autocast on its own, such as the evaluator)."""
    if not emulated_bf16(device, precision):
        yield
        return
    # Only the on/off switch (torch.backends.mkldnn.flags() also resets TF32
    # settings, with a warning on CPUs).
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
