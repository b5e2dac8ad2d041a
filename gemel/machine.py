"""What this machine offers the model's arithmetic: the CPU's model and flags, whether bf16 is
fast, and the dtype a device gets for a ``--dtype`` setting.

The one place that reads ``/proc/cpuinfo`` and resolves a dtype: the backends, training
(mixed precision), reports (:func:`gemel.eval.measure.cpu`) and the benchmarks ask here.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(CPU model name, its flags) from ``/proc/cpuinfo``; (None, no flags) where it is absent
    (not Linux)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmul several times faster than fp32. Without them (AVX2 only)
    PyTorch emulates bf16 and it is ~100x *slower* than fp32 (measured on an AVX2 host)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """The weights' dtype for ``requested`` (:data:`gemel.config.DTYPES`, or a torch name); for
    ``"auto"``: bf16 where the device has fast bf16 (CUDA with bf16 support, CPU with
    AMX/AVX512-BF16), else fp16 on older GPUs, else fp32."""
    if requested != "auto":
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


__all__ = ["cpu_info", "cpu_has_fast_bf16", "pick_dtype"]
