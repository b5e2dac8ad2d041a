"""Resumable runs: a rerun links only what is missing and the file ends in input order."""
from __future__ import annotations

import json

import pytest

from gemel.errors import DataError, GemelError
from gemel.eval.metrics import hits_at_k
from gemel.runs import run
from gemel.types import Candidate, LinkResult, Mention

MENTIONS = [Mention(str(i), f"text {i}", "m", entity_id=f"Q{i % 3}") for i in range(7)]


class CountingLinker:
    """Links mention i to Q(i % 3), and records which mentions it was asked for."""

    def __init__(self, fail_on: str | None = None):
        self.seen: list[str] = []
        self.fail_on = fail_on

    def __call__(self, batch):
        if any(m.id == self.fail_on for m in batch):
            raise GemelError(f"cannot read image of {self.fail_on}")
        self.seen.extend(m.id for m in batch)
        return [LinkResult(m.id, (Candidate(f"Q{int(m.id) % 3}", "t", -1.0),), m.entity_id)
                for m in batch]


def test_resume_skips_done_and_restores_input_order(tmp_path):
    out = tmp_path / "pred.jsonl"
    # a previous run finished mentions 5 and 2 (in that order) and was killed mid-line
    out.write_text(json.dumps({"id": "5", "candidates": [], "gold_id": "Q2", "error": None}) + "\n"
                   + json.dumps({"id": "2", "candidates": [], "gold_id": "Q2", "error": None}) + "\n"
                   + '{"id": "3", "candid')
    link = CountingLinker()
    rows = run(link, MENTIONS, out, batch_size=2, progress=False)
    assert sorted(link.seen) == ["0", "1", "3", "4", "6"]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [m.id for m in MENTIONS] == [r["id"] for r in rows]


def test_one_bad_mention_fails_alone(tmp_path):
    rows = run(CountingLinker(fail_on="4"), MENTIONS, tmp_path / "p.jsonl", batch_size=4,
               progress=False)
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert list(errors) == ["4"] and "cannot read image" in errors["4"]
    assert hits_at_k(rows, (1,)) == {"n": 7, "errors": 1, "H@1": round(100 * 6 / 7, 2)}


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(DataError, match="duplicate mention id '1'"):
        run(CountingLinker(), MENTIONS[:2] + MENTIONS[1:2], tmp_path / "p.jsonl", progress=False)


def test_hits_at_k_ignores_rows_without_gold():
    rows = [{"id": "a", "gold_id": "Q1", "candidates": [{"entity_id": "Q2"}, {"entity_id": "Q1"}]},
            {"id": "b", "gold_id": None, "candidates": []}]
    assert hits_at_k(rows, (1, 2)) == {"n": 1, "errors": 0, "H@1": 0.0, "H@2": 100.0}
