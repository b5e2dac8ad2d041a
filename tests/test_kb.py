"""KnowledgeBase: loading, checks with located errors, title index, lookup, fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import gemel.kb_jsonl as kb_jsonl
from gemel.errors import DataError
from gemel.kb import KnowledgeBase
from gemel.types import Entity

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "Q90", "title": "Paris", "aliases": ["City of Light"],
     "description": "capital of France"},
    {"id": "Q47899", "title": "Paris Hilton"},
    {"id": "Q810", "title": "Jordan", "aliases": ["Hashemite Kingdom of Jordan"]},
    {"id": "Q41421", "title": "Michael Jordan", "aliases": ["Jordan"], "image": "mj.jpg"},
    {"id": "Qdab", "title": "Jordan"},  # a second entity with the same title
    {"id": "Q312", "title": "Apple Inc.", "aliases": ["APPLE"]},
    {"id": "Q89", "title": "Apple", "description": None, "aliases": None, "image": None},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def kb_file(tmp_path) -> Path:
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, "")  # blank lines are allowed
    return write_lines(tmp_path / "kb.jsonl", lines)


def test_load_and_container_protocol(kb_file):
    kb = KnowledgeBase.from_jsonl(kb_file)
    assert len(kb) == 7
    assert "Q90" in kb and "Q1" not in kb
    assert [e.id for e in kb] == [r["id"] for r in ROWS]  # file order
    e = kb["Q41421"]
    assert e == Entity("Q41421", "Michael Jordan", ("Jordan",), "", "mj.jpg")
    assert kb["Q89"].description == "" and kb["Q89"].aliases == ()
    with pytest.raises(KeyError, match="Q1"):
        kb["Q1"]


def test_unique_titles_and_title_index(kb_file):
    kb = KnowledgeBase.from_jsonl(kb_file)
    assert kb.titles == ["Paris", "Paris Hilton", "Jordan", "Michael Jordan", "Apple Inc.", "Apple"]
    assert kb.title_index("Jordan") == 2
    assert kb.ids_for_title_index(2) == ["Q810", "Qdab"]
    assert kb.ids_for_title("Jordan") == ["Q810", "Qdab"]
    assert kb.ids_for_title("jordan") == [] and kb.title_index("jordan") == -1
    assert kb.title_index("Paris Hilton") == 1 and kb.title_index("Paris Hilto") == -1
    for i, t in enumerate(kb.titles):  # every index round-trips through the marisa trie
        assert kb.title_index(t) == i
        assert all(kb[x].title == t for x in kb.ids_for_title_index(i))
    assert sorted(kb.titles_with_prefix("Paris")) == ["Paris", "Paris Hilton"]
    with pytest.raises(IndexError):
        kb.ids_for_title_index(len(kb.titles))


def test_lookup_casefold_and_aliases(kb_file):
    kb = KnowledgeBase.from_jsonl(kb_file)
    # Titles first (file order), then alias-only matches.
    assert kb.lookup("jordan") == ["Q810", "Qdab", "Q41421"]
    assert kb.lookup("jordan", aliases=False) == ["Q810", "Qdab"]
    assert kb.lookup("jordan", casefold=False) == []
    assert kb.lookup("Jordan", casefold=False) == ["Q810", "Qdab", "Q41421"]
    assert kb.lookup("  apple ") == ["Q89", "Q312"]  # title "Apple", then alias "APPLE"
    assert kb.lookup("city  of light") == ["Q90"]  # whitespace runs collapse
    assert kb.lookup("Paris Hilto") == []


def test_fingerprint_tracks_ids_and_titles_only(kb_file, tmp_path):
    kb = KnowledgeBase.from_jsonl(kb_file)
    same = KnowledgeBase.from_entities(kb)
    assert same.fingerprint == kb.fingerprint and len(kb.fingerprint) == 64
    rows = [dict(r) for r in ROWS]
    rows[0]["description"] = "another description"
    rows[1]["aliases"] = ["Hilton"]
    assert KnowledgeBase.from_entities(_entities(rows)).fingerprint == kb.fingerprint
    rows[1]["title"] = "Paris Whitney Hilton"
    assert KnowledgeBase.from_entities(_entities(rows)).fingerprint != kb.fingerprint
    swapped = [ROWS[1], ROWS[0]] + ROWS[2:]
    assert KnowledgeBase.from_entities(_entities(swapped)).fingerprint != kb.fingerprint
    # Length-prefixed pairs: moving characters between id and title changes the hash.
    a = KnowledgeBase.from_entities([Entity("Q1", "23")])
    b = KnowledgeBase.from_entities([Entity("Q12", "3")])
    assert a.fingerprint != b.fingerprint


def _entities(rows):
    return [Entity(r["id"], r["title"], tuple(r.get("aliases") or ()), r.get("description") or "",
                   r.get("image")) for r in rows]


def test_write_jsonl_round_trip(kb_file, tmp_path):
    kb = KnowledgeBase.from_jsonl(kb_file)
    out = tmp_path / "sub" / "kb_out.jsonl"
    kb.write_jsonl(out)
    back = KnowledgeBase.from_jsonl(out)
    assert list(back) == list(kb) and back.fingerprint == kb.fingerprint
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "Q90", "title": "Paris", "aliases": ["City of Light"],
                     "description": "capital of France", "image": None}
    assert not list((tmp_path / "sub").glob("*.tmp"))  # no temporary file left


def test_integer_ids_are_kept_as_strings(tmp_path):
    path = write_lines(tmp_path / "kb.jsonl", ['{"id": 7, "title": "Seven"}'])
    assert KnowledgeBase.from_jsonl(path).ids == ["7"]


@pytest.mark.parametrize("lines, record, field, words", [
    (['{"id": "Q1", "title": "A"}', '{"id": "Q2", "title": "B"}', '{"id": "Q1", "title": "C"}'],
     "line 3", "'id'", ["duplicate id 'Q1'", "first on line 1"]),
    (['{"id": "Q1", "title": "A"}', '{"id": "Q2", "title": "B",}'], "line 2", None,
     ["not valid JSON"]),
    (['{"id": "Q1"}'], "line 1", "'title'", ["non-empty string", "missing"]),
    (['{"id": "Q1", "title": 5}'], "line 1", "'title'", ["(int)"]),
    (['{"id": "Q1", "title": "   "}'], "line 1", "'title'", ["non-empty string"]),
    (['{"title": "A"}'], "line 1", "'id'", ["missing"]),
    (['{"id": "Q1", "title": "A", "aliases": "A2"}'], "line 1", "'aliases'", ["list of strings"]),
    (['{"id": "Q1", "title": "A", "description": 3}'], "line 1", "'description'",
     ["string or null"]),
    (['["Q1", "A"]'], "line 1", None, ["expected a JSON object"]),
    # Two objects on one line must not pass as two entities (the chunked decoder checks counts).
    (['{"id": "Q1", "title": "A"}, {"id": "Q2", "title": "B"}'], "line 1", None,
     ["not valid JSON"]),
    # Two broken lines that would join into two valid objects are still named as broken.
    (['{"id": "Q1", "title": "A", "z": [1', '2]}, {"id": "Q2", "title": "B"}'], "line 1", None,
     ["not valid JSON"]),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, record, field, words):
    path = write_lines(tmp_path / "my_kb.jsonl", lines)
    with pytest.raises(DataError) as err:
        KnowledgeBase.from_jsonl(path)
    msg = str(err.value)
    assert "my_kb.jsonl" in msg and f"record {record}" in msg
    if field:
        assert f"field {field}" in msg
    for w in words:
        assert w in msg


def test_bad_line_found_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(kb_jsonl, "_CHUNK", 3)
    lines = [json.dumps({"id": f"Q{i}", "title": f"T{i}"}) for i in range(10)]
    kb = KnowledgeBase.from_jsonl(write_lines(tmp_path / "ok.jsonl", lines))
    assert kb.ids == [f"Q{i}" for i in range(10)]
    lines[7] = lines[7][:-1]  # truncated object on line 8
    with pytest.raises(DataError, match="record line 8"):
        KnowledgeBase.from_jsonl(write_lines(tmp_path / "bad.jsonl", lines))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        KnowledgeBase.from_jsonl(tmp_path / "nope.jsonl")


def test_from_entities_checks_like_the_file_reader():
    with pytest.raises(DataError, match=r"record entity 2, field 'id': duplicate id 'a' "
                                        r"\(first on entity 0\)"):
        KnowledgeBase.from_entities([Entity("a", "A"), Entity("b", "B"), Entity("a", "C")])
    with pytest.raises(DataError, match="record entity 0, field 'title'"):
        KnowledgeBase.from_entities([Entity("a", "")])
    empty = KnowledgeBase.from_entities([])
    assert len(empty) == 0 and empty.titles == [] and empty.title_index("x") == -1
    assert empty.lookup("x") == []


def test_twenty_thousand_entities_shared_titles(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(20_000):
            # Half the titles repeat once: 10k unique titles, two ids each.
            f.write(json.dumps({"id": f"Q{i}", "title": f"Entity {i % 10_000}", "aliases": [],
                                "description": "a short description", "image": None}) + "\n")
    kb = KnowledgeBase.from_jsonl(path)  # speed is a benchmark matter, not a test assertion
    assert len(kb) == 20_000 and len(kb.titles) == 10_000
    assert kb.ids_for_title("Entity 42") == ["Q42", "Q10042"]


def test_shipped_example_kb_and_mentions():
    from gemel.data import read_mentions

    kb = KnowledgeBase.from_jsonl(REPO / "examples" / "kb.jsonl")
    mentions = read_mentions(REPO / "examples" / "mentions.jsonl")
    assert 35 <= len(kb) <= 50 and 10 <= len(mentions) <= 20
    for m in mentions:
        assert m.entity_id in kb and kb[m.entity_id].title == m.entity, m.id
        assert m.mention in m.text
    # The demo is about ambiguity: the same surface string links to different entities.
    by_word: dict[str, set[str]] = {}
    for m in mentions:
        by_word.setdefault(m.mention.casefold(), set()).add(m.entity_id)
    assert sum(len(v) > 1 for v in by_word.values()) >= 4
    assert "Paris Hilton" in kb.titles and "Michael Jordan" in kb.titles
    assert kb.lookup("jordan") == ["Q810"]  # the country; Michael Jordan needs context
