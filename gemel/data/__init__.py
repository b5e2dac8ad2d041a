"""Mentions from our JSONL and from public MEL releases, and converters to our formats.

    from gemel.data import read_mentions
    mentions = read_mentions("WikiDiverse.json", split="test", splits_path="splits.json")

Formats (``fmt``, auto-detected from the JSON shape): ``native`` (our mentions JSONL),
``wikidiverse``, ``wikimel``, ``mimic``, ``vpwiki``; see each module for the shape and the id
scheme. NIL answers are kept and marked (:mod:`gemel.data.nil`). Images named by a record but not
found are dropped from the mention (text only) and counted in the :class:`ReadReport`. Adding a
reader: docs/architecture.md ("Where to add").
"""
from gemel.data.convert import convert
from gemel.data.native import write_mentions
from gemel.data.nil import NIL, is_nil
from gemel.data.read import read_mentions, read_release
from gemel.data.report import ReadReport
from gemel.data.shape import FORMATS

__all__ = ["FORMATS", "NIL", "ReadReport", "convert", "is_nil", "read_mentions", "read_release",
           "write_mentions"]
