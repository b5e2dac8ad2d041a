"""Resumable runs: a rerun links only what is missing and the file ends in input order."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemel.errors import DataError, GemelError
from gemel.eval.metrics import hits_at_k
from gemel.runs import error_summary, merge_parts, run, select_shard, shard_of
from tests.conftest import REPO
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
    # a previous run of these mentions linked batches [2, 3] and [4, 5] (not [0, 1]), and was
    # killed while writing a row of [6]
    run(CountingLinker(), MENTIONS[2:6], out, batch_size=2, progress=False)
    with open(out, "a") as f:
        f.write('{"id": "6", "candid')
    link = CountingLinker()
    rows = run(link, MENTIONS, out, batch_size=2, progress=False)
    assert sorted(link.seen) == ["0", "1", "6"]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [m.id for m in MENTIONS] == [r["id"] for r in rows]


def test_the_sidecar_counts_the_linking_time_over_resumes(tmp_path):
    """Reports quote how long a run took: the sidecar adds each session's mentions and seconds."""
    out = tmp_path / "pred.jsonl"
    run(CountingLinker(), MENTIONS[:4], out, batch_size=2, progress=False)
    first = json.loads((tmp_path / "pred.jsonl.run.json").read_text())["timing"]
    assert first["linked"] == 4 and first["seconds"] >= 0
    run(CountingLinker(), MENTIONS, out, batch_size=2, progress=False)  # links 4, 5, 6 only
    timing = json.loads((tmp_path / "pred.jsonl.run.json").read_text())["timing"]
    assert timing["linked"] == 7 and timing["seconds"] >= first["seconds"]


def test_a_partly_written_batch_is_linked_again_whole(tmp_path):
    """Batches are fixed slices of the input: mention 3 shares its batch with 2 whatever was
    resumed, so a resumed run pads and batches every mention as an uninterrupted run does."""
    out = tmp_path / "pred.jsonl"
    run(CountingLinker(), MENTIONS[:3], out, batch_size=2, progress=False)  # [0, 1] [2]
    link = CountingLinker()
    run(link, MENTIONS, out, batch_size=2, progress=False)
    assert link.seen == ["2", "3", "4", "5", "6"]


def test_a_narrower_rerun_keeps_every_row(tmp_path):
    out = tmp_path / "pred.jsonl"
    run(CountingLinker(), MENTIONS, out, batch_size=3, progress=False)
    before = out.read_text()
    link = CountingLinker()
    rows = run(link, MENTIONS[:2], out, batch_size=3, progress=False)
    assert link.seen == [] and [r["id"] for r in rows] == ["0", "1"]
    assert out.read_text() == before  # the 5 rows it did not ask for are still there, in order


def test_a_foreign_file_is_never_touched(tmp_path):
    out = tmp_path / "kb.jsonl"
    out.write_text('{"id": "Q1", "title": "Paris"}\n')
    with pytest.raises(GemelError, match="not a gemel predictions file") as err:
        run(CountingLinker(), MENTIONS, out, progress=False)
    assert str(out) in str(err.value)
    assert out.read_text() == '{"id": "Q1", "title": "Paris"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb.jsonl"]


def test_predictions_of_another_run_are_refused(tmp_path):
    out = tmp_path / "pred.jsonl"
    run(CountingLinker(), MENTIONS, out, progress=False, identity={"settings": {"num_beams": 5}})
    before = out.read_text()
    with pytest.raises(GemelError, match=r"another run.*num_beams: 5 in the file, 3 now"):
        run(CountingLinker(), MENTIONS, out, progress=False,
            identity={"settings": {"num_beams": 3}})
    assert out.read_text() == before
    # the same settings resume (nothing to do)
    link = CountingLinker()
    run(link, MENTIONS, out, progress=False, identity={"settings": {"num_beams": 5}})
    assert link.seen == [] and out.read_text() == before


def test_a_damaged_line_inside_the_file_is_an_error_not_a_silent_drop(tmp_path):
    out = tmp_path / "pred.jsonl"
    run(CountingLinker(), MENTIONS, out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    with pytest.raises(DataError, match="line 3"):
        run(CountingLinker(), MENTIONS, out, progress=False)


def test_a_second_writer_is_refused(tmp_path):
    from filelock import FileLock

    out = tmp_path / "pred.jsonl"
    with FileLock(str(out) + ".lock"):  # another process (or run) holds the output
        code = ("import sys; from gemel.runs import run; from tests.test_runs import "
                "CountingLinker, MENTIONS; run(CountingLinker(), MENTIONS, sys.argv[1], "
                "progress=False)")
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "another gemel process is writing" in proc.stderr
    assert not out.exists()
    # once the lock is free (its holder finished, or was killed), the run goes ahead
    assert len(run(CountingLinker(), MENTIONS, out, progress=False)) == len(MENTIONS)


def test_error_rows_are_linked_again_on_rerun(tmp_path):
    out = tmp_path / "p.jsonl"
    first = run(CountingLinker(fail_on="4"), MENTIONS, out, batch_size=2, progress=False)
    assert "cannot read image" in error_summary(first) and "1 of 7" in error_summary(first)
    link = CountingLinker()  # the cause was fixed
    rows = run(link, MENTIONS, out, batch_size=2, progress=False)
    assert link.seen == ["4", "5"] and error_summary(rows) is None
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [m.id for m in MENTIONS]


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


def test_shards_partition_the_mentions_stably():
    ids = [f"m{i}" for i in range(200)]
    shards = [[i for i in ids if shard_of(i, 3) == s] for s in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and all(len(s) > 40 for s in shards)
    # a stable hash (not Python's salted hash()): the same in every process
    code = "from gemel.runs import shard_of; print([shard_of(f'm{i}', 3) for i in range(200)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, timeout=120, env={"PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str([shard_of(i, 3) for i in ids])


def test_merge_joins_parts_in_input_order_and_refuses_overlaps_and_gaps(tmp_path):
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}.jsonl"
        run(CountingLinker(), select_shard(MENTIONS, (i, 2)), part, progress=False,
            identity={"input": {"sha256": "x"}, "shard": [i, 2]})
        parts.append(part)
    rows = merge_parts(parts, MENTIONS, tmp_path / "all.jsonl")
    whole = run(CountingLinker(), MENTIONS, tmp_path / "one.jsonl", progress=False)
    assert rows == whole
    assert (tmp_path / "all.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    with pytest.raises(GemelError, match="are in no part"):
        merge_parts(parts[:1], MENTIONS, tmp_path / "gap.jsonl")
    with pytest.raises(GemelError, match="same shard"):
        merge_parts([parts[0], parts[0]], MENTIONS, tmp_path / "twice.jsonl")
    # a part of another split of the same run, overlapping the first
    other = tmp_path / "other.jsonl"
    run(CountingLinker(), MENTIONS[:3], other, progress=False,
        identity={"input": {"sha256": "x"}, "shard": [0, 3]})
    with pytest.raises(GemelError, match="in more than one part"):
        merge_parts([parts[0], parts[1], other], MENTIONS, tmp_path / "overlap.jsonl")
    with pytest.raises(GemelError, match="another input"):
        merge_parts(parts, MENTIONS, tmp_path / "x.jsonl", identity={"input": {"sha256": "y"}})
    assert not any((tmp_path / n).exists() for n in ("gap.jsonl", "twice.jsonl", "overlap.jsonl"))
