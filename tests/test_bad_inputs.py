"""Bad inputs through the `gemel` CLI: each names file, line and field, and exits as documented.

The cases live in tests/bad_inputs.py (benchmarks/bad_inputs_table.py prints them as a table);
the fuzz tests below check the readers, the KB loader and the trie on random input.
"""
from __future__ import annotations

import pytest

from tests.bad_inputs import RUNNABLE, build_env, run_case


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("bad-inputs-env"))


def test_the_table_is_long_enough():
    assert len(RUNNABLE) >= 30
    assert len({c.id for c in RUNNABLE}) == len(RUNNABLE)


@pytest.mark.parametrize("case", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_bad_input(case, env, tmp_path):
    code, text = run_case(case, env, tmp_path / case.id)
    assert "Traceback" not in text and "TRACEBACK" not in text, text
    for fragment in case.expect:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    assert code == case.exit_code, text


# -- fuzzing: readers, KB loader and trie never end in anything but a DataError or valid data -----
import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gemel.data import read_release  # noqa: E402
from gemel.errors import DataError  # noqa: E402
from gemel.kb import KnowledgeBase  # noqa: E402
from gemel.trie import EntityTrie  # noqa: E402
from gemel.types import BadMention, Mention  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                               max_size=3), max_leaves=8)
field_values = st.none() | st.text(max_size=5) | st.integers(0, 3) | st.lists(
    st.integers(-2, 40) | st.lists(st.integers(0, 40), max_size=3), max_size=5)
mention_records = st.fixed_dictionaries(
    {}, optional={k: field_values for k in ("id", "text", "mention", "image", "bbox", "polygon",
                                            "entity_id", "entity", "extra")})
kb_records = st.fixed_dictionaries(
    {}, optional={k: field_values for k in ("id", "title", "aliases", "description", "image")})


def lines_of(records):
    """A line: a record as JSON, any JSON value, or raw bytes (bad encodings, cut lines)."""
    return st.lists(records.map(lambda r: json.dumps(r).encode())
                    | json_values.map(lambda v: json.dumps(v).encode())
                    | st.binary(max_size=12), max_size=6)


def _write(tmp_path, name: str, lines: list[bytes]):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@FUZZ
@given(lines=lines_of(mention_records), on_bad=st.sampled_from(["raise", "skip", "row"]))
def test_fuzz_native_reader(tmp_path, lines, on_bad):
    path = _write(tmp_path, "m.jsonl", lines)
    try:
        mentions, report = read_release(path, fmt="native", on_bad=on_bad)
    except DataError as err:
        assert "m.jsonl" in str(err)
        return
    assert all(isinstance(m, Mention) and isinstance(m.id, str) and m.id for m in mentions)
    assert len({m.id for m in mentions}) == len(mentions)
    good = [m for m in mentions if not isinstance(m, BadMention)]
    assert all(isinstance(m.text, str) for m in good)
    assert all(m.bbox is None or (m.bbox[2] > m.bbox[0] and m.bbox[3] > m.bbox[1]) for m in good)
    assert all(m.polygon is None or len(m.polygon) >= 3 for m in good)
    rows = [m for m in mentions if isinstance(m, BadMention)]
    assert report.bad.count == (len(rows) if on_bad == "row" else report.bad.count)
    if on_bad == "raise":
        assert not rows and report.bad.count == 0


@FUZZ
@given(doc=json_values, name=st.sampled_from(["r.json", "r.jsonl"]),
       on_bad=st.sampled_from(["raise", "skip", "row"]))
def test_fuzz_release_readers(tmp_path, doc, name, on_bad):
    path = _write(tmp_path, name, [json.dumps(doc).encode()])
    try:
        mentions, _ = read_release(path, on_bad=on_bad)
    except DataError:
        return
    assert all(isinstance(m, Mention) for m in mentions)


@FUZZ
@given(lines=lines_of(kb_records))
def test_fuzz_kb_loader(tmp_path, lines):
    path = _write(tmp_path, "kb.jsonl", lines)
    try:
        kb = KnowledgeBase.from_jsonl(path, on_bad="skip")
    except DataError as err:
        assert "kb.jsonl" in str(err)
        return
    assert len(kb) > 0 and len(set(kb.ids)) == len(kb)
    assert all(isinstance(e.title, str) and e.title.strip() for e in kb)
    try:
        strict = KnowledgeBase.from_jsonl(path)
    except DataError:
        assert kb.bad.count > 0  # strict fails only where skipping left something out
        return
    assert kb.bad.count == 0 and strict.ids == kb.ids and strict.titles == kb.titles


@FUZZ
@given(seqs=st.lists(st.lists(st.integers(0, 4), max_size=5), min_size=1, max_size=12),
       probes=st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=10))
def test_fuzz_trie_against_brute_force(seqs, probes):
    term = 5
    trie = EntityTrie.build(seqs, term)
    full = [s + [term] for s in seqs]

    def brute(prefix):
        return {f[len(prefix)] for f in full if len(f) > len(prefix) and f[:len(prefix)] == prefix}

    prefixes = [f[:i] for f in full for i in range(len(f) + 1)] + probes
    for prefix in prefixes:
        assert set(trie.allowed(prefix).tolist()) == brute(prefix), prefix
    for i, f in enumerate(full):
        assert trie.value(trie.node_of(f)) == full.index(f)  # a repeated title keeps the first
        assert trie.sequence(i) == f
    assert trie.lengths().tolist() == [len(f) for f in full]
    some = sorted(set(range(0, len(seqs), 2)))
    sub = trie.subtrie(some)
    kept = {tuple(full[full.index(full[i])]) for i in some}
    for prefix in prefixes:
        assert set(sub.allowed(prefix).tolist()) == {
            f[len(prefix)] for f in map(list, kept)
            if len(f) > len(prefix) and f[:len(prefix)] == prefix}
