"""Which precision training runs in, decided by the machine: bf16 autocast where the processor does bf16 natively.

`mixed_precision="auto"` (the default of every not_hub training function and of `not-hub train`) means:
- on a CUDA GPU: bf16 autocast when the GPU supports bf16, else float32;
- on a CPU: bf16 autocast (float32 master weights, as on a GPU) when the processor has native bf16 instructions
  (x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`), else float32. On such a CPU a bf16 matmul runs ~2.4x faster than a
  float32 one (AMD EPYC, torch 2.13); on one without them torch emulates bf16 and it is slower than float32.
  Where the processor's flags cannot be read (not Linux), a short measured probe decides, once per process.

`ACCELERATE_MIXED_PRECISION` (what `accelerate launch --mixed_precision ...` and `accelerate config` set) takes
precedence over the machine's choice, so a launcher's setting is honoured. "no", "bf16" and "fp16" force a choice.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time

import torch

logger = logging.getLogger(__name__)

CHOICES = ("auto", "no", "bf16", "fp16")
_NATIVE_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16: "bf16" in Features)


def cpu_flags() -> set[str] | None:
    """The processor's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@functools.cache
def _probe_bf16_faster() -> bool:
    """Time a 512x512 matmul in bf16 and float32 (best of 5): whether bf16 is faster here. Cached per process."""
    a = torch.randn(512, 512)

    def best(t: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            t @ t
            times.append(time.perf_counter() - start)
        return min(times)

    best(a)  # warm-up
    return best(a.bfloat16()) < best(a)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively: from its feature flags, or (where they cannot be read) a measured probe."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & _NATIVE_FLAGS)
    native = _probe_bf16_faster()
    logger.info("no CPU flags to read on %s: a measured probe says bf16 is %s", platform.system(), native)
    return native


def resolve_mixed_precision(value: str | None) -> str:
    """The precision a run uses: "no", "bf16" or "fp16". `value` "auto" (or None) decides by the machine.

    Example:
        ```python
        >>> not_hub.resolve_mixed_precision("auto")   # on a CPU with avx512_bf16
        'bf16'
        ```
    """
    if value not in (None, "auto"):
        return value
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launcher in ("no", "bf16", "fp16"):
        return launcher
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"
