"""Choosing the device and dtype, and reading how much memory a device has.

`--dtype auto` means bfloat16 on CUDA and, on CPU, bfloat16 only where the processor
computes it natively (AVX512-BF16 or AMX): elsewhere PyTorch emulates bf16 matmuls and
float32 is both faster and more exact. The choice and its reason are logged and
reported by `/model`, because "why is it slow / why do the logits differ" starts there.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from modeldeploy.server.errors import UserInputError

log = logging.getLogger("modeldeploy.engine")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Placement:
    """Where the model runs and in which dtype, with the reason for an automatic choice."""

    device: torch.device
    dtype: torch.dtype
    reason: str
    #: The user named the dtype (`--dtype`), rather than `auto` choosing it.
    explicit: bool = False

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    if {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit `cuda` without a GPU is bad input."""
    if device in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: no CUDA device is available in this process")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserInputError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve `--device` and `--dtype` into a Placement and say why."""
    dev = resolve_device(device)
    if dtype not in ("auto", "", *DTYPES):
        raise UserInputError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    if dtype not in ("auto", ""):
        return Placement(dev, DTYPES[dtype], f"--dtype {dtype}", explicit=True)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Placement(dev, torch.bfloat16, "auto: CUDA device supports bfloat16")
        return Placement(dev, torch.float16, "auto: CUDA device without bfloat16")
    if cpu_has_fast_bf16():
        return Placement(dev, torch.bfloat16, "auto: CPU has native bf16 (avx512_bf16/amx)")
    return Placement(dev, torch.float32, "auto: CPU lacks native bf16, float32 is faster")


def memory_info(device: torch.device) -> dict[str, int | None]:
    """Free/total bytes of the device (CUDA) or of the host (CPU, from /proc/meminfo)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "free_bytes": int(free),
            "total_bytes": int(total),
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
        }
    info: dict[str, int | None] = {"free_bytes": None, "total_bytes": None}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemAvailable":
                info["free_bytes"] = int(rest.split()[0]) * 1024
            elif key == "MemTotal":
                info["total_bytes"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return info


def kv_cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """float32 K/V on CPU, the model dtype elsewhere.

    Decode attention is a few small matmuls per layer; on CPU oneDNN runs them 2-3x
    slower in bf16 than in float32 (bench/QUANT.md), which costs more per token than the
    doubled cache bandwidth at serving lengths. Untouched cache pages cost no memory
    (`KVCache` zeroes by handing pages back), and the context sizing counts the real
    element size.
    """
    return torch.float32 if device.type == "cpu" else dtype
