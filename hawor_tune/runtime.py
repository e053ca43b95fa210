"""Where and how computation runs: device choice, autocast precision, seeding and RNG state, batches."""

from __future__ import annotations

import contextlib
import ctypes
import random
import sys
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch

from hawor_tune.config import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; a forced device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device is 'mps' but MPS is not available (use auto or cpu)")
    return torch.device(name)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks below it come from
# the heap and are re-used; only larger ones are mapped afresh on every allocation.
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Let glibc keep the memory a training step frees for the next step instead of returning it to the OS.

    By default glibc gives the top of its heaps back once more than about twice its (adaptive) mmap
    threshold is free, and a CPU training step frees most of what it allocates at its end: the next step then
    takes tens of thousands of fresh pages from the kernel, each one faulted in and zeroed, which costs system
    time on every step. Fixes the mmap threshold at glibc's maximum and the trim threshold at 1 GiB for the process;
    its peak memory is unchanged, its freed memory is held until the process exits.

    Returns:
        Whether the settings were applied (False off glibc, e.g. on macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (x86's AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates bf16, slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these queries: assume not
        return False


# train.precision's explicit settings: the autocast dtype of each (None: no autocast, fp32).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting; ``auto`` is bf16 on CUDA and on a CPU with bf16 in
    hardware (:func:`native_bf16_cpu`, where it is faster than fp32 at the same accuracy), none (fp32)
    elsewhere."""
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())
        return torch.bfloat16 if fast else None
    return _AUTOCAST[precision]


def resolved_precision(device_name: str, precision: str) -> str:
    """What ``train.device`` and ``train.precision`` compute in on this machine: ``fp32``, ``bf16`` or ``fp16``."""
    dtype = autocast_dtype(select_device(device_name), precision)
    return next(name for name, d in _AUTOCAST.items() if d is dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def capped(loader: Iterable, max_batches: int) -> tuple[Iterable, int]:
    total = len(loader)  # type: ignore[arg-type]
    if max_batches and max_batches < total:
        return islice(loader, max_batches), max_batches
    return loader, total
