"""WikiDiverse as redistributed by KGMEL/MIMIC: a JSON list of sentences::

    {"id": 0, "sentence": "...", "imgPath": "mention_0.jpg", "mention": ["UK", "parliament"],
     "entity": ["United Kingdom", "Parliament of the United Kingdom"], "answer": ["Q145", "Q11010"]}

One Mention per item of ``mention``, id ``f"{sentence_id}-{i}"`` (i from 0), gold
``entity_id = answer[i]`` (a QID), ``entity = entity[i]`` (the Wikipedia title). The image is
``imgPath`` under the images folder (default: ``images/`` beside the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from gemel.data.images import ImageFinder
from gemel.data.records import gold, id_field, list_or_str, same_lengths, text_field
from gemel.data.report import ReadReport
from gemel.errors import DataError
from gemel.types import Mention


def read_wikidiverse(path: Path, data: Any, select: set[str] | None, images: ImageFinder,
                     report: ReadReport) -> Iterator[Mention]:
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of sentences, got a {type(data).__name__}",
                        path=path,
                        fix="is this WikiMEL (an object keyed by id)? pass fmt='wikimel'")
    for index, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path=path,
                            record=f"index {index}")
        sid = id_field(rec, "id", path, f"index {index}")
        sid = str(index) if sid is None else sid
        if select is not None and sid not in select:
            continue
        where = f"index {index} (id {sid})"
        text = text_field(rec, "sentence", path, where)
        words, _ = list_or_str(rec, "mention", path, where)
        answers, _ = list_or_str(rec, "answer", path, where)
        titles, _ = list_or_str(rec, "entity", path, where, required=False)
        n = same_lengths({"mention": words, "answer": answers,
                          "entity": titles if "entity" in rec else None}, path, where)
        report.records += 1
        if n == 0:
            report.empty_records += 1
            continue
        img_path = text_field(rec, "imgPath", path, where, required=False)
        image = images.find([img_path], n_mentions=n) if img_path else None
        for i in range(n):
            mention = words[i]
            if not isinstance(mention, str):
                raise DataError(f"item {i} is a {type(mention).__name__}, expected a string",
                                path=path, record=where, field="mention")
            entity_id, title = gold(answers[i], titles[i] if titles else None, path, where)
            yield Mention(f"{sid}-{i}", text, mention, image, None, None, entity_id, title)
