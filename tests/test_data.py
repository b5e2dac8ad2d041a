"""Readers and converters of gemel.data on small fixtures written here, and on the real releases."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import needs_data

from gemel.data import NIL, convert, is_nil, read_mentions, read_release, write_mentions
from gemel.errors import DataError
from gemel.kb import KnowledgeBase
from gemel.types import Mention


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")  # readers only check that the file exists
    return path


# -- native --------------------------------------------------------------------------------------
def native_row(i, **fields):
    row = {"id": f"m{i}", "text": f"text {i}", "mention": f"word {i}", "image": None, "bbox": None,
           "polygon": None, "entity_id": f"Q{i}", "entity": f"Title {i}"}
    row.update(fields)
    return row


def test_native_round_trip_with_images(tmp_path):
    touch_image(tmp_path / "data" / "img" / "a.jpg")
    rows = [native_row(0, image="img/a.jpg", bbox=[1, 2, 30, 40]),
            native_row(1, mention=None, image="img/a.jpg", polygon=[[0, 0], [10, 0], [5, 8]]),
            native_row(2, entity_id=None, entity=None)]
    src = jsonl(tmp_path / "data" / "m.jsonl", rows)
    ms = read_mentions(src)
    assert [m.id for m in ms] == ["m0", "m1", "m2"]
    assert ms[0].image == str((tmp_path / "data" / "img" / "a.jpg").resolve())
    assert ms[0].bbox == (1.0, 2.0, 30.0, 40.0) and ms[1].polygon == ((0, 0), (10, 0), (5, 8))
    assert ms[1].mention is None and ms[2].entity_id is None and not is_nil(ms[2])
    # Written next to the images: paths stay relative; read back, identical mentions.
    out = tmp_path / "data" / "copy.jsonl"
    assert write_mentions(ms, out) == 3
    assert json.loads(out.read_text().splitlines()[0])["image"] == "img/a.jpg"
    assert read_mentions(out) == ms
    # Written elsewhere: absolute (a ../.. path would break when the file moves).
    far = tmp_path / "elsewhere" / "copy.jsonl"
    write_mentions(ms, far)
    assert json.loads(far.read_text().splitlines()[0])["image"] == ms[0].image
    assert read_mentions(far) == ms


def test_native_missing_image_is_dropped_and_counted(tmp_path, caplog):
    src = jsonl(tmp_path / "m.jsonl", [native_row(0, image="gone.jpg"), native_row(1)])
    ms, report = read_release(src)
    assert ms[0].image is None and report.images_missing == 1 and report.images_found == 0
    assert report.missing_example.endswith("gone.jpg")
    with caplog.at_level(logging.WARNING, logger="gemel.data"):
        read_mentions(src)
    assert "1 of 2 mentions name an image that was not found" in caplog.text
    # The images folder given by the user is searched first.
    touch_image(tmp_path / "pics" / "gone.jpg")
    ms, report = read_release(src, images_dir=tmp_path / "pics")
    assert ms[0].image == str(tmp_path / "pics" / "gone.jpg") and report.images_missing == 0


@pytest.mark.parametrize("row, field, words", [
    (native_row(0, bbox=[1, 2, 3], image="a.jpg"), "bbox", "4 numbers"),
    (native_row(0, bbox=[1, 2, 3, "4"], image="a.jpg"), "bbox", "4 numbers"),
    (native_row(0, bbox=[10, 10, 5, 20], image="a.jpg"), "bbox", "empty box"),
    (native_row(0, bbox=[1, 2, 3, 4]), "image", "'image' is null"),
    (native_row(0, polygon=[[0, 0], [1, 1]], image="a.jpg"), "polygon", "3 or more"),
    (native_row(0, polygon=[[0, 0], [1, 1], [2]], image="a.jpg"), "polygon", "3 or more"),
    (native_row(0, mention=None), "mention", "nothing marks the mention"),
    (native_row(0, text=None), "text", "expected a string"),
    (native_row(0, entity_id=["Q1"]), "entity_id", "expected a string or null"),
    (dict(native_row(0), entityid="Q1"), "entityid", "unknown field"),
])
def test_native_bad_records_name_file_record_and_field(tmp_path, row, field, words):
    src = jsonl(tmp_path / "my_mentions.jsonl", [native_row(9), row])
    with pytest.raises(DataError) as err:
        read_mentions(src)
    msg = str(err.value)
    assert "my_mentions.jsonl" in msg and "record line 2 (id 'm0')" in msg
    assert f"field {field!r}" in msg and words in msg


def test_native_bad_json_and_duplicate_ids(tmp_path):
    src = jsonl(tmp_path / "m.jsonl", [native_row(0), '{"id": "m1", "text": '])
    with pytest.raises(DataError, match=r"m\.jsonl, record line 2: not valid JSON"):
        read_mentions(src, fmt="native")
    src = jsonl(tmp_path / "d.jsonl", [native_row(0), native_row(1), native_row(0)])
    with pytest.raises(DataError, match=r"record line 3, field 'id': duplicate mention id 'm0' "
                                        r"\(first on line 1\)"):
        read_mentions(src)


def test_native_split_selection_by_record_part_of_the_id(tmp_path):
    rows = [native_row(0, id="12-0"), native_row(1, id="12-1"), native_row(2, id="13-0"),
            native_row(3, id="plain")]
    src = jsonl(tmp_path / "m.jsonl", rows)
    splits = dump(tmp_path / "splits.json", {"train": [13], "test": [12, "plain"]})
    assert [m.id for m in read_mentions(src, split="test", splits_path=splits)] == \
        ["12-0", "12-1", "plain"]
    assert [m.id for m in read_mentions(src, split="train", splits_path=splits)] == ["13-0"]
    assert [m.id for m in read_mentions(src, limit=2)] == ["12-0", "12-1"]


# -- WikiDiverse ---------------------------------------------------------------------------------
WIKIDIVERSE = [
    {"id": 0, "sentence": "Students outside the UK parliament.", "imgPath": "mention_0.jpg",
     "mention": ["UK", "parliament"],
     "entity": ["United Kingdom", "Parliament of the United Kingdom"],
     "answer": ["Q145", "Q11010"], "img-url": "https://example.org/a.jpg"},
    {"id": 1, "sentence": "Rain in New York.", "imgPath": "mention_1.jpg", "mention": ["New York"],
     "entity": ["New York (state)"], "answer": ["Q1384"]},
    {"id": 2, "sentence": "The mayor of New York spoke.", "imgPath": "mention_2.jpg",
     "mention": ["New York", "mayor"], "entity": ["New York", "Mayor"], "answer": ["Q1384", "nil"]},
    {"id": 3, "sentence": "Nothing to link here.", "imgPath": "mention_3.jpg", "mention": [],
     "entity": [], "answer": []},
]


def test_wikidiverse_reader(tmp_path):
    src = dump(tmp_path / "WikiDiverse.json", WIKIDIVERSE)
    touch_image(tmp_path / "images" / "mention_1.jpg")  # default folder: images/ beside the file
    ms, report = read_release(src)
    assert report.format == "wikidiverse"
    assert [m.id for m in ms] == ["0-0", "0-1", "1-0", "2-0", "2-1"]
    assert ms[1] == Mention("0-1", "Students outside the UK parliament.", "parliament", None, None,
                            None, "Q11010", "Parliament of the United Kingdom")
    assert ms[2].image == str(tmp_path / "images" / "mention_1.jpg")
    assert report.images_found == 1 and report.images_missing == 4 and report.image_records == 1
    assert report.records == 4 and report.empty_records == 1
    # --limit cuts the first record short: its uncounted mentions are not reported missing
    first, cut = read_release(src, limit=1)
    assert len(first) == 1 and cut.limited
    assert cut.images_missing == 1 and cut.images_found == 0
    assert "1 of 1 mentions" in cut.missing_images_message()
    # NIL: kept, marked, never a crash; nil="drop" leaves it out.
    assert is_nil(ms[4]) and ms[4].entity_id is None and ms[4].entity == NIL and report.nil == 1
    kept, report = read_release(src, nil="drop")
    assert [m.id for m in kept] == ["0-0", "0-1", "1-0", "2-0"] and report.nil == 1
    first, report = read_release(src, limit=3)
    assert [m.id for m in first] == ["0-0", "0-1", "1-0"] and report.limited


def test_wikidiverse_bad_record_names_file_record_and_field(tmp_path):
    rows = json.loads(json.dumps(WIKIDIVERSE))
    rows[2]["answer"] = ["Q1384"]
    src = dump(tmp_path / "wd.json", rows)
    with pytest.raises(DataError) as err:
        read_mentions(src)
    assert ("wd.json, record index 2 (id 2), field 'answer': 1 items but 'mention' has 2"
            in str(err.value))
    rows = json.loads(json.dumps(WIKIDIVERSE))
    rows[1]["sentence"] = None
    with pytest.raises(DataError, match=r"wd2\.json, record index 1 \(id 1\), field 'sentence'"):
        read_mentions(dump(tmp_path / "wd2.json", rows), fmt="wikidiverse")
    rows = json.loads(json.dumps(WIKIDIVERSE))
    rows[0]["answer"][1] = 11010
    assert read_mentions(dump(tmp_path / "wd3.json", rows))[1].entity_id == "11010"
    rows[0]["answer"][1] = {"qid": "Q11010"}
    with pytest.raises(DataError, match=r"record index 0 \(id 0\), field 'answer'"):
        read_mentions(dump(tmp_path / "wd4.json", rows))


def test_split_selection_and_the_overlap_rule(tmp_path):
    src = dump(tmp_path / "wd.json", WIKIDIVERSE)
    # Sentence 1 sits in train and test, sentence 2 in train and val, sentence 3 in val and test.
    splits = dump(tmp_path / "splits.json", {"train": [0, 1, 2], "val": [2, 3], "test": [1, 3]})
    ms, r = read_release(src, split="train", splits_path=splits)
    assert [m.id for m in ms] == ["0-0", "0-1"] and r.dropped_overlap == 2 and r.split_ids == 3
    ms, r = read_release(src, split="val", splits_path=splits)
    assert [m.id for m in ms] == ["2-0", "2-1"] and r.dropped_overlap == 1
    ms, r = read_release(src, split="test", splits_path=splits)  # test is never changed
    assert [m.id for m in ms] == ["1-0"] and r.dropped_overlap == 0 and r.records == 2
    # "dev" and "val" name the same split; string ids match integer ids.
    dev = dump(tmp_path / "dev.json", {"train": ["0"], "dev": ["1", "9"]})
    ms, r = read_release(src, split="val", splits_path=dev)
    assert [m.id for m in ms] == ["1-0"] and r.split_ids_absent == 1
    with pytest.raises(DataError, match=r"dev\.json, field 'test': no split 'test' \(the file "
                                        r"has \['dev', 'train'\]\)"):
        read_mentions(src, split="test", splits_path=dev)
    with pytest.raises(DataError, match="split and splits_path go together"):
        read_mentions(src, split="test")
    bad = dump(tmp_path / "bad.json", {"test": [1, [2]]})
    with pytest.raises(DataError, match=r"bad\.json, field 'test': item 1 is a list"):
        read_mentions(src, split="test", splits_path=bad)


# -- WikiMEL -------------------------------------------------------------------------------------
WIKIMEL = {
    "21717": {"id": "21717", "sentence": "Francis Condon in the early 20th Century",
              "mentions": ["Francis Condon"], "entities": ["Francis Condon"],
              "answer": ["Q1441444"]},
    "46351": {"id": "46351", "sentence": "Powers with Noel Harrison in The Girl from U.N.C.L.E.",
              "mentions": ["Noel Harrison", "Powers"],
              "entities": ["Noel Harrison", "Stefanie Powers"],
              "answer": ["Q532915", "Q256474"]},
    # The other releases' shape: plain strings, one mention per record, the record id kept.
    "500": {"id": "500", "sentence": "Ada Lovelace, portrait", "mentions": "Ada Lovelace",
            "entities": "Ada Lovelace", "answer": "Q7259"},
    "501": {"id": "501", "sentence": "An unknown man", "mentions": "man", "entities": "",
            "answer": "nil"},
    "502": {"id": "502", "sentence": "Unlabelled input", "mentions": ["Somebody"]},
}


def test_wikimel_lists_or_strings_nil_and_images(tmp_path):
    src = dump(tmp_path / "WikiMEL.json", WIKIMEL)
    touch_image(tmp_path / "images" / "46351.jpg")
    touch_image(tmp_path / "images" / "500.jpg")
    touch_image(tmp_path / "images" / "99999.jpg")  # an image without a record is ignored
    ms, report = read_release(src)
    assert report.format == "wikimel"
    assert [m.id for m in ms] == ["21717-0", "46351-0", "46351-1", "500", "501", "502-0"]
    assert ms[2].mention == "Powers" and ms[2].entity == "Stefanie Powers"
    assert ms[2].entity_id == "Q256474"
    assert ms[1].image == ms[2].image == str(tmp_path / "images" / "46351.jpg")
    assert ms[3] == Mention("500", "Ada Lovelace, portrait", "Ada Lovelace",
                            str(tmp_path / "images" / "500.jpg"), None, None, "Q7259",
                            "Ada Lovelace")
    assert is_nil(ms[4]) and report.nil == 1
    assert ms[5].entity_id is None and ms[5].entity is None and not is_nil(ms[5])
    assert report.image_records == 2 and report.images_found == 3 and report.images_missing == 3
    # An explicit images folder wins over the default one.
    touch_image(tmp_path / "other" / "21717.jpg")
    ms, report = read_release(src, images_dir=tmp_path / "other")
    assert ms[0].image == str(tmp_path / "other" / "21717.jpg") and report.image_records == 1


def test_wikimel_split_keys_and_bad_record(tmp_path):
    src = dump(tmp_path / "WikiMEL.json", WIKIMEL)
    splits = dump(tmp_path / "splits.json", {"train": ["21717"], "dev": ["500"],
                                             "test": ["46351", "404"]})
    ms, report = read_release(src, split="test", splits_path=splits)
    assert [m.id for m in ms] == ["46351-0", "46351-1"] and report.split_ids_absent == 1
    assert [m.id for m in read_mentions(src, split="dev", splits_path=splits)] == ["500"]
    bad = json.loads(json.dumps(WIKIMEL))
    bad["46351"]["entities"] = ["Noel Harrison"]
    with pytest.raises(DataError) as err:
        read_mentions(dump(tmp_path / "wm_bad.json", bad))
    assert ("wm_bad.json, record id 46351, field 'entities': 1 items but 'mentions' has 2"
            in str(err.value))
    bad = json.loads(json.dumps(WIKIMEL))
    bad["500"]["mentions"] = None
    with pytest.raises(DataError, match=r"record id 500, field 'mentions': field is missing"):
        read_mentions(dump(tmp_path / "wm_bad2.json", bad))


# -- MIMIC and VPWiki ----------------------------------------------------------------------------
MIMIC = [
    {"id": "WikiMEL-1", "sentence": "Noel Harrison sings", "mentions": "Noel%20Harrison",
     "entities": "Noel Harrison", "answer": "Q532915", "imgPath": "sub/1.png"},
    {"id": "WikiMEL-2", "sentence": "No picture", "mentions": "Stefanie Powers",
     "entities": "Stefanie Powers", "answer": "Q256474", "imgPath": ""},
    {"id": "WikiMEL-3", "sentence": "Someone unknown", "mentions": "Someone", "entities": "",
     "answer": "nil", "imgPath": "3.jpg"},
    {"id": "WikiMEL-4", "sentence": "Title only in the KB", "mentions": "Ada",
     "answer": "Q7259", "imgPath": "4.jpg"},
]


def test_mimic_reader(tmp_path):
    src = dump(tmp_path / "WIKIMEL_test.json", MIMIC)
    # MIMIC converted every image to JPEG: "sub/1.png" is found as mention_image/1.jpg.
    touch_image(tmp_path / "mention_image" / "1.jpg")
    ms, report = read_release(src)
    assert report.format == "mimic"
    assert [m.id for m in ms] == ["WikiMEL-1", "WikiMEL-2", "WikiMEL-3", "WikiMEL-4"]
    assert ms[0].mention == "Noel Harrison"  # URL-unquoted
    assert ms[0].image == str(tmp_path / "mention_image" / "1.jpg")
    assert ms[1].image is None  # imgPath "": no image, not a missing one
    assert is_nil(ms[2]) and ms[3].entity is None and ms[3].entity_id == "Q7259"
    assert report.images_found == 1 and report.images_missing == 2
    assert [m.id for m in read_mentions(src, nil="drop")] == ["WikiMEL-1", "WikiMEL-2", "WikiMEL-4"]


def test_mimic_convert_with_kb_entity_and_qid2id(tmp_path):
    src = dump(tmp_path / "WIKIMEL_test.json", MIMIC)
    dump(tmp_path / "qid2id.json", {"Q532915": 0, "Q256474": 1, "Q7259": 2, "Q1": 3})
    dump(tmp_path / "kb_entity.json", [
        {"id": 0, "type": "entity", "entity_name": "Noel%20Harrison", "attr": "Sex: male.",
         "image_list": ["a.jpg"]},
        {"id": 1, "type": "entity", "entity_name": "Stefanie Powers", "attr": "Sex: female.",
         "image_list": []},
        {"id": 2, "type": "entity", "entity_name": "Ada Lovelace", "attr": "Sex: female."},
        {"id": 3, "qid": "Q1", "type": "entity", "entity_name": "Universe", "attr": ""},
    ])
    # Gold KB: the record without a title is titled from kb_entity.json found beside the file.
    s = convert(src, tmp_path / "out" / "m.jsonl", tmp_path / "out" / "kb.jsonl")
    kb = KnowledgeBase.from_jsonl(tmp_path / "out" / "kb.jsonl")
    assert kb.ids == ["Q532915", "Q256474", "Q7259"] and kb["Q7259"].title == "Ada Lovelace"
    assert s["mentions"] == 4 and s["nil"] == 1 and s["kb_entities"] == 3
    s = convert(src, tmp_path / "out" / "m.jsonl", tmp_path / "out" / "kb.jsonl", kb_from="names")
    kb = KnowledgeBase.from_jsonl(tmp_path / "out" / "kb.jsonl")
    assert kb.ids == ["Q532915", "Q256474", "Q7259", "Q1"]
    assert kb["Q532915"].title == "Noel Harrison" and kb["Q532915"].description == "Sex: male."
    assert kb["Q532915"].image == "a.jpg" and s["kb_gold_not_in_names"] == 0


def test_vpwiki_blank_mentions_become_visual_prompts(tmp_path):
    rows = [{"id": "0", "sentence": "Gert Steegmans winning stage 3.", "mentions": " ",
             "entities": "Gert Steegmans", "answer": "Q381794",
             "imgPath": "test_img/mention_0.jpg"},
            {"id": "1", "sentence": "Gert Steegmans winning stage 3.", "mentions": " ",
             "entities": "Four Days of Dunkirk", "answer": "Q513691",
             "imgPath": "test_img/mention_1.jpg"}]
    src = dump(tmp_path / "test.json", rows)
    touch_image(tmp_path / "test_img" / "mention_0.jpg")  # relative to the file
    ms, report = read_release(src)
    assert report.format == "vpwiki"
    assert ms[0] == Mention("0", "Gert Steegmans winning stage 3.", None,
                            str(tmp_path / "test_img" / "mention_0.jpg"), None, None, "Q381794",
                            "Gert Steegmans")
    assert ms[1].mention is None and ms[1].image is None and report.images_missing == 1
    # Read as mimic explicitly, the same records give the same mentions.
    assert read_mentions(src, fmt="mimic") == ms


def test_unknown_shapes_and_formats(tmp_path):
    with pytest.raises(DataError, match=r"odd\.json: cannot tell the format"):
        read_mentions(dump(tmp_path / "odd.json", [{"foo": 1}]))
    with pytest.raises(DataError, match="unknown format 'csv'"):
        read_mentions(dump(tmp_path / "x.json", []), fmt="csv")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        read_mentions((tmp_path / "broken.json").write_text("[{") and tmp_path / "broken.json")
    with pytest.raises(DataError, match="no such file"):
        read_mentions(tmp_path / "absent.json")
    with pytest.raises(DataError, match="expected a JSON list of sentences"):
        read_mentions(dump(tmp_path / "wm.json", WIKIMEL), fmt="wikidiverse")


# -- convert -------------------------------------------------------------------------------------
def test_convert_kb_from_gold_uses_every_record_and_counts_conflicts(tmp_path):
    src = dump(tmp_path / "wd.json", WIKIDIVERSE)
    splits = dump(tmp_path / "splits.json", {"train": [0, 2], "val": [], "test": [1]})
    s = convert(src, tmp_path / "test.jsonl", tmp_path / "kb.jsonl", split="test",
                splits_path=splits)
    assert s["mentions"] == 1 and s["split"] == "test"
    assert [m.id for m in read_mentions(tmp_path / "test.jsonl")] == ["1-0"]
    kb = KnowledgeBase.from_jsonl(tmp_path / "kb.jsonl")
    # All records, not just the test split's answer: otherwise the KB would leak the answers.
    assert kb.ids == ["Q145", "Q11010", "Q1384"]
    # Q1384 is titled "New York (state)" first, "New York" later: first kept, other an alias.
    assert kb["Q1384"].title == "New York (state)" and kb["Q1384"].aliases == ("New York",)
    assert s["kb_title_conflicts"] == 1 and s["kb_entities"] == 3 and s["kb_unique_titles"] == 3
    assert s["kb_fingerprint"] == kb.fingerprint


def test_convert_with_names_and_descriptions(tmp_path):
    src = dump(tmp_path / "WikiMEL.json", WIKIMEL)
    ne = dump(tmp_path / "qid2ne.json", {"Q1441444": "Francis Condon", "Q532915": "Noel Harrison",
                                         "Q256474": "Stefanie Powers", "Q42": "Douglas Adams"})
    ab = dump(tmp_path / "qid2abs.json", {"Q42": "Sex: male.", "Q7259": "Sex: female."})
    s = convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", kb_from="names", qid2ne=ne,
                qid2abs=ab)
    kb = KnowledgeBase.from_jsonl(tmp_path / "kb.jsonl")
    assert kb.ids == ["Q1441444", "Q532915", "Q256474", "Q42"]
    assert kb["Q42"].description == "Sex: male."
    assert s["kb_gold_not_in_names"] == 1  # Q7259 is gold but not in qid2ne
    s = convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", kb_from="both", qid2ne=ne,
                qid2abs=ab)
    kb = KnowledgeBase.from_jsonl(tmp_path / "kb.jsonl")
    assert kb.ids[-1] == "Q7259" and kb["Q7259"].description == "Sex: female." and len(kb) == 5
    s = convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", qid2abs=ab, limit=2)
    assert s["mentions"] == 2 and s["kb_entities"] == 4  # limit trims mentions, not the KB
    assert KnowledgeBase.from_jsonl(tmp_path / "kb.jsonl")["Q7259"].description == "Sex: female."
    with pytest.raises(DataError, match="needs the KB's names"):
        convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", kb_from="names")
    bad = dump(tmp_path / "bad_ne.json", {"Q1": ["x"]})
    with pytest.raises(DataError, match=r"bad_ne\.json, record Q1, field 'name'"):
        convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", kb_from="names", qid2ne=bad)


# -- the real releases (../shared/data) ----------------------------------------------------------
def test_real_wikidiverse_splits_and_gold_kb(tmp_path):
    src = needs_data("wikidiverse", "WikiDiverse.json")
    splits = needs_data("wikidiverse", "splits.json")
    every, r = read_release(src)
    assert (r.records, len(every)) == (7405, 14851) and r.nil == 0
    test, r = read_release(src, split="test", splits_path=splits)
    print(f"WikiDiverse test: {r.records} sentences, {len(test)} mentions")
    assert (r.records, len(test), r.dropped_overlap) == (1058, 2044, 0)
    train, r = read_release(src, split="train", splits_path=splits)
    # 22 train sentences are also listed in val or test (3 of them in all three splits).
    assert (r.split_ids, r.dropped_overlap, r.records) == (5570, 22, 5548)
    assert not {m.id for m in train} & {m.id for m in test}
    s = convert(src, tmp_path / "test.jsonl", tmp_path / "kb.jsonl", split="test",
                splits_path=splits)
    print({k: v for k, v in s.items() if k.startswith("kb_")})
    kb = KnowledgeBase.from_jsonl(tmp_path / "kb.jsonl")
    # 7,650 distinct gold titles name 7,643 QIDs: 7 QIDs carry two titles (first kept as title).
    assert (len(kb), len(kb.titles), s["kb_title_conflicts"]) == (7643, 7643, 7)
    assert kb["Q1384"].aliases and all(m.entity_id in kb for m in test)


def test_real_wikimel_images_and_splits(tmp_path):
    src = needs_data("wikimel", "WikiMEL.json")
    splits = needs_data("wikimel", "splits.json")
    s = convert(src, tmp_path / "m.jsonl", tmp_path / "kb.jsonl", kb_from="names",
                qid2ne=needs_data("wikimel", "qid2ne.json"),
                qid2abs=needs_data("wikimel", "qid2abs.json"))
    print(f"WikiMEL: {s['records']} records, {s['mentions']} mentions, {s['image_records']} "
          f"records with an image ({s['images_found']} mentions)")
    assert (s["records"], s["mentions"], s["nil"]) == (22136, 25846, 0)
    # 45 images ship in images/; 38 of them belong to a record, covering 69 mentions.
    assert (s["image_records"], s["images_found"]) == (38, 69)
    assert s["images_dir"] == str(src.parent / "images")
    assert (s["kb_entities"], s["kb_unique_titles"], s["kb_gold_not_in_names"]) == (18880, 18880, 0)
    test, r = read_release(src, split="test", splits_path=splits, find_images=False)
    assert (r.split_ids, r.records, r.split_ids_absent, len(test)) == (4883, 4412, 471, 5131)
