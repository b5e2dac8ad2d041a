"""One batch from ``Linker.link_batch`` to its rows enters each module once, going down the floors
(docs/architecture.md, "One mention, from gemel link to its prediction row"): the candidate
retriever and the backend are called once per batch, even when the sub-tries and the rerank pool
both need them."""
from __future__ import annotations

import sys

import pytest

from gemel.backends.hf import HFBackend, HFStepper
from gemel.candidates import CandidateRetriever
from gemel.linker import Linker, LinkerConfig
from gemel.rerank import FEATURES, FusionModel
from tests.test_incontext import KB, TRAIN, needs_minilm

# a module's "room": the package for backends and retrieval (their registries and bases)
ROOMS = ("gemel.backends", "gemel.retrieval")


def room(module: str) -> str:
    return next((r for r in ROOMS if module.startswith(r + ".")), module)


def rooms_called_by_the_linker(fn) -> list[str]:
    """The gemel modules (by room) that gemel.linker's own code calls into while ``fn()`` runs,
    in order, a run of calls into the same room counted once; the records of gemel.types are
    left out (built wherever a result is)."""
    seen: list[str] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "")
        if (caller == "gemel.linker" and callee.startswith("gemel.")
                and callee not in ("gemel.linker", "gemel.types")):  # records: built anywhere
            if not seen or seen[-1] != room(callee):
                seen.append(room(callee))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def count_calls(monkeypatch, target, name: str, into: dict) -> None:
    """Count calls of ``target.name`` in ``into[name]`` (the call still happens)."""
    original = getattr(target, name)

    def counted(*args, **kwargs):
        into[name] = into.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, counted)


@pytest.mark.parametrize("num_candidates", [0, 3])
def test_one_batch_enters_each_module_once(llama_pair, tmp_path, monkeypatch, num_candidates):
    needs_minilm()
    model, tok = llama_pair
    FusionModel(dict.fromkeys(FEATURES, 1.0), {}).save(tmp_path / "fusion.json")
    config = LinkerConfig(model="tiny", num_beams=2, top_k=3, fusion_pool=4, batch_size=4,
                          demos=2, retriever="random", num_candidates=num_candidates,
                          fusion=str(tmp_path / "fusion.json"))
    linker = Linker(config, KB, HFBackend(model, tok), train=TRAIN)
    calls: dict[str, int] = {}
    for name in ("run", "search", "score"):
        count_calls(monkeypatch, HFBackend, name, calls)
    count_calls(monkeypatch, HFStepper, "start", calls)  # a prefill
    for name in ("retrieve", "top"):
        count_calls(monkeypatch, CandidateRetriever, name, calls)
    count_calls(monkeypatch, linker.candidate_retriever.encoder, "embed", calls)
    batch = TRAIN[:3]

    rows = linker.link_batch(batch)
    assert len(rows) == 3 and all(r.candidates and "pool" in r.extra for r in rows)
    # the backend once (search and the pool's scoring in one call, one prefill), the candidate
    # retriever once (the sub-tries' and the pool's titles, each query field embedded once)
    assert calls == {"run": 1, "start": 1, "retrieve": 1, "embed": 2}, calls
    monkeypatch.undo()  # the counters are callers of their own: trace without them
    order = rooms_called_by_the_linker(lambda: linker.link_batch(batch))
    repeated = sorted({m for m in order if order.count(m) > 1})
    assert not repeated, f"entered twice by the linker: {repeated} in {order}"
    stages = ["gemel.retrieval", "gemel.prompting", "gemel.model", "gemel.candidates",
              "gemel.backends", "gemel.rerank"]
    assert [m for m in order if m in stages] == stages, order
