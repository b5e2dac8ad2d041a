"""One entry point over every mentions format: read_release / read_mentions."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from gemel.data.images import ImageFinder
from gemel.data.mimic import IMAGE_FOLDERS, read_mimic
from gemel.data.native import read_native
from gemel.data.nil import is_nil
from gemel.data.report import ReadReport
from gemel.data.shape import FORMATS, detect, is_jsonl, load_json
from gemel.data.splits import load_split
from gemel.data.wikidiverse import read_wikidiverse
from gemel.data.wikimel import read_wikimel
from gemel.errors import DataError, check_on_bad
from gemel.types import Mention

log = logging.getLogger("gemel.data")

_READERS = {"wikidiverse": read_wikidiverse, "wikimel": read_wikimel, "mimic": read_mimic,
            "vpwiki": read_mimic}


def read_release(path: str | os.PathLike, fmt: str = "auto", split: str | None = None,
                 splits_path: str | os.PathLike | None = None,
                 images_dir: str | os.PathLike | None = None, limit: int | None = None,
                 nil: str = "keep", *, find_images: bool = True,
                 on_bad: str = "raise") -> tuple[list[Mention], ReadReport]:
    """Read mentions from our JSONL or a public release, with a report of what was kept.

    ``fmt``: "auto" (from the JSON shape) or one of :data:`FORMATS`. ``split`` with
    ``splits_path`` selects records (see :mod:`gemel.data.splits` for the overlap rule).
    ``images_dir``: folder of the release's images (default: a folder such as ``images/`` beside
    the file). ``limit``: the first N mentions kept (after selection and NIL handling).
    ``nil``: "keep" (marked, see :mod:`gemel.data.nil`) | "drop".
    ``find_images=False`` skips the image lookup (every image None, nothing counted): for passes
    that need only the text and gold, such as building a KB.
    ``on_bad`` (:data:`gemel.errors.ON_BAD`): a bad record raises its DataError ("raise"), is
    left out ("skip") or becomes a :class:`~gemel.types.BadMention` in its place ("row", for the
    mentions to link); skipped and row records are counted in ``report.bad``.
    """
    check_on_bad(on_bad)
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}", path=path, field="fmt",
                        fix=f"use 'auto' or one of {list(FORMATS)}")
    if nil not in ("keep", "drop"):
        raise DataError(f"unknown nil mode {nil!r}", field="nil", fix='use "keep" or "drop"')
    if (split is None) != (splits_path is None):
        raise DataError("split and splits_path go together", path=path,
                        field="split" if split is None else "splits_path",
                        fix="give both (e.g. split='test', splits_path='splits.json') or neither")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}", field="limit")
    if not path.is_file():
        raise DataError("no such file", path=path, fix="check the path of the mentions file")

    data = None
    if fmt == "auto":
        fmt = "native" if is_jsonl(path) else detect(path, data := load_json(path))
    elif fmt != "native":
        data = load_json(path)

    report = ReadReport(path=str(path), format=fmt, split=split)
    select = None
    if split is not None:
        select, report.split_ids, report.dropped_overlap = load_split(splits_path, split)
    defaults = {"native": (), "mimic": IMAGE_FOLDERS, "vpwiki": IMAGE_FOLDERS}.get(fmt, ("images",))
    images = ImageFinder(path.parent, images_dir, report, defaults=defaults, enabled=find_images)
    if fmt == "native":
        stream = read_native(path, select, images, report, on_bad)
    else:
        stream = _READERS[fmt](path, data, select, images, report, on_bad)

    out: list[Mention] = []
    seen: set[str] = set()
    for m in stream:
        if limit is not None and len(out) >= limit:
            report.limited = True
            break
        if m.id in seen:  # native checks its own lines; this catches releases with repeated ids
            err = DataError(f"two mentions get the id {m.id!r}", path=path, record=m.id,
                            field="id", fix="record ids must be unique within a file")
            if on_bad != "skip":  # predictions are keyed by id: two rows cannot share one
                raise err
            report.bad.add(err)
            continue
        seen.add(m.id)
        if is_nil(m):
            report.nil += 1
            if nil == "drop":
                continue
        out.append(m)
    report.mentions = len(out)
    if report.limited:
        # the finder counted whole records, and the last one may be cut short: count what was kept
        # (exact where the kept part of that record is all found or all missing, as in releases)
        report.images_found = sum(m.image is not None for m in out)
        report.images_missing = min(report.images_missing, len(out) - report.images_found)
    if select is not None and fmt != "native":
        report.split_ids_absent = len(select) - report.records if not report.limited else 0
    return out, report


def read_mentions(path: str | os.PathLike, fmt: str = "auto", split: str | None = None,
                  splits_path: str | os.PathLike | None = None,
                  images_dir: str | os.PathLike | None = None, limit: int | None = None,
                  nil: str = "keep", on_bad: str = "raise") -> list[Mention]:
    """Mentions from our JSONL or a public release (see :func:`read_release`).

    Logs one warning when images named by the records are not found (the mentions are kept,
    text only), one naming the first bad records (``on_bad`` "skip" or "row"), and when split
    ids have no record.
    """
    mentions, report = read_release(path, fmt, split, splits_path, images_dir, limit, nil,
                                    on_bad=on_bad)
    for message in (report.missing_images_message(),
                    report.bad.message("records", "made error rows" if on_bad == "row"
                                       else "skipped")):
        if message:
            log.warning(message)
    if report.split_ids_absent:
        log.info("%s: %d of the %d ids listed for split %r have no record in the file",
                 path, report.split_ids_absent, report.split_ids, split)
    return mentions
