"""What a benchmark cell records about its model and its machine: parameter counts, peak memory,
and the environment (package versions, git commit, CPU flags), so that a figure can be traced to
the code and the hardware that produced it."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

PACKAGES = ("gemel", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf",
            "sentence-transformers", "numpy", "bm25s")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def parameter_counts(model_name: str, module) -> dict:
    """``{"parameters", "non_embedding", "counted_from"}`` of an LLM.

    An offline model reports its registry counts (measured from its GGUF; tied embeddings once,
    see gemel/offline_models.yaml) — what users see, even where the dequantised copy holds a tied
    matrix twice. Any other model is counted from the loaded ``module``: every parameter once
    (tied weights are one Parameter), non-embedding = minus the input embedding table and a
    separate output matrix.
    """
    from gemel.sources import OFFLINE

    spec = OFFLINE.get(model_name)
    if spec is not None and spec.parameters:
        return {"parameters": spec.parameters["total"],
                "non_embedding": spec.parameters["non_embedding"], "counted_from": "registry"}
    total = sum(p.numel() for p in module.parameters())
    tables = {id(w): w.numel() for w in (getattr(module.get_input_embeddings(), "weight", None),
                                         getattr(module.get_output_embeddings(), "weight", None))
              if w is not None}
    return {"parameters": total, "non_embedding": total - sum(tables.values()),
            "counted_from": "loaded model"}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``/proc/self/clear_refs`` 5), so that
    the next :func:`peak_rss_gib` covers only what ran since. False where that is not possible
    (the peak then covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gib() -> float:
    """Peak resident set size of this process (``getrusage``), GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


@lru_cache(maxsize=1)
def cpu() -> dict:
    """CPU model, the SIMD flags that decide fp32/bf16 speed, and core counts."""
    from gemel.machine import cpu_info

    model, flags = cpu_info()  # not Linux: no model, the flags unknown
    return {"model": model or platform.processor(), "flags": [f for f in CPU_FLAGS if f in flags],
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else None}


def git_commit() -> str | None:
    """The commit of the gemel checkout in use (``+dirty`` with uncommitted changes); None when
    gemel is not run from a git checkout."""
    import gemel

    where = Path(gemel.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment() -> dict:
    """Package versions, git commit, Python, CPU (flags), torch threads and GPU, as JSON."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "cpu": cpu(),
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
