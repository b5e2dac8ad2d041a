"""The inputs of a run (KB, mentions to link, demonstration pool) read under one bad-record
policy, with what was left out told to the user.

Policy (``strict=False``, the CLI default): a bad KB record or a bad record of the demonstration
pool is skipped, counted and reported (the first few with their line); a bad record of the
mentions to link becomes an error row of the predictions (:class:`~gemel.types.BadMention`) and
the run goes on. ``strict=True`` (CLI ``--strict``) makes any bad record an error.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from gemel.data.read import read_release
from gemel.errors import DataError
from gemel.kb import KnowledgeBase
from gemel.types import BadMention, Mention

log = logging.getLogger("gemel.data")

Echo = Callable[[str], None]

_UNMARKED = ("nothing marks the mention: its 'mention' is empty and it has no image (named but "
             "not found, or none)")
_UNMARKED_FIX = "give the mention string, or put its image where --images points"


def on_bad(role: str, strict: bool) -> str:
    """The reader policy for ``role``: "link" (the mentions to link), "pool" or "kb"."""
    return "raise" if strict else ("row" if role == "link" else "skip")


def load_kb(path: str | os.PathLike, strict: bool = False,
            echo: Echo = log.warning) -> KnowledgeBase:
    """The KB, its bad records skipped and reported (``strict``: the first is an error)."""
    kb = KnowledgeBase.from_jsonl(path, on_bad=on_bad("kb", strict))
    message = kb.bad.message("KB records")
    if message:
        echo(message)
    return kb


def load_mentions(path: str | os.PathLike, fmt: str = "auto", split: str | None = None,
                  splits_path: str | os.PathLike | None = None,
                  images_dir: str | os.PathLike | None = None, limit: int | None = None, *,
                  role: str = "link", strict: bool = False,
                  echo: Echo = log.warning) -> list[Mention]:
    """Mentions to link (``role="link"``: bad records become :class:`BadMention` rows) or a
    demonstration pool (``role="pool"``: bad records skipped). A mention that nothing marks (no
    mention string and no image found) is bad too: it can be neither linked nor shown."""
    policy = on_bad(role, strict)
    mentions, report = read_release(path, fmt, split, splits_path, images_dir, limit,
                                    on_bad=policy)
    if role == "link" and not report.records and not report.bad.count:
        raise DataError("no mentions to link" + (f" in split {split!r}" if split else ""),
                        path=path, fix="check the file (one JSON object a line) and --split")
    out: list[Mention] = []
    for m in mentions:
        if isinstance(m, BadMention) or (m.mention and m.mention.strip()) or m.image:
            out.append(m)
            continue
        # a reader keeps such a mention (VPWiki: the box is in an image that may be missing)
        err = DataError(_UNMARKED, path=path, record=m.id, field="mention", fix=_UNMARKED_FIX)
        if policy == "raise":
            raise err
        report.bad.add(err)
        if policy == "row":
            out.append(BadMention(m.id, m.text, error=str(err), entity_id=m.entity_id,
                                  entity=m.entity))
    for message in (report.missing_images_message(),
                    report.bad.message("records" if role == "link" else "demonstration records",
                                       "made error rows" if policy == "row" else "skipped")):
        if message:
            echo(message)
    return out


def gold_absent(mentions: Sequence[Mention], kb: KnowledgeBase) -> dict:
    """Mentions whose gold entity is not in the KB (they can only be missed): counts and a few
    examples. NIL and unlabelled mentions do not count."""
    absent = [m for m in mentions if m.entity_id is not None and m.entity_id not in kb
              and not isinstance(m, BadMention)]
    entities = list(dict.fromkeys(m.entity_id for m in absent))
    return {"mentions": len(absent), "entities": len(entities), "examples": entities[:5]}


def gold_absent_message(absent: dict, n_labelled: int) -> str | None:
    if not absent["mentions"]:
        return None
    return (f"{absent['mentions']} of {n_labelled} labelled mentions have a gold entity that is "
            f"not in the KB ({absent['entities']} distinct, e.g. {absent['examples']}): they "
            "count as misses; add those entities to the KB, or build it from the release "
            "(gemel convert --kb-out)")


__all__ = ["gold_absent", "gold_absent_message", "load_kb", "load_mentions", "on_bad"]
