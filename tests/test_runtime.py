from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from hawor_tune import runtime
from hawor_tune.runtime import autocast_dtype, native_bf16_cpu, resolved_precision

# In a fresh interpreter (malloc's state is per process): four rounds of 16 blocks of 2 MiB, each round
# written in full and then freed, as a training step allocates and frees its activations. Prints the minor
# page faults of each round.
_ROUNDS = """
import ctypes, resource, sys
from hawor_tune.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(2 << 20) for _ in range(16)]
    for b in blocks:
        ctypes.memset(b, 1, 2 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""

PAGES_PER_ROUND = 16 * (2 << 20) // 4096  # 8192 pages written per round


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_new_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # The first round faults every page in either way.
    assert kept[0] >= PAGES_PER_ROUND * 0.9 and default[0] >= PAGES_PER_ROUND * 0.9
    # glibc's default gives the freed blocks back, so each later round faults its pages in again ...
    assert min(default[1:]) >= PAGES_PER_ROUND * 0.9
    # ... while the kept memory is written again without touching the kernel.
    assert max(kept[1:]) < PAGES_PER_ROUND * 0.05


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="x86 flags in /proc/cpuinfo")
def test_native_bf16_follows_the_cpus_own_flags():
    flags = _cpu_flags()
    assert native_bf16_cpu() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_is_bf16_on_a_cpu_only_with_bf16_in_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: native)
    assert autocast_dtype(torch.device("cpu"), "auto") is expected
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("mps"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert resolved_precision("cpu", "auto") == ("bf16" if native else "fp32")
