"""Resumable batch runs: predictions are appended as they are made, a rerun skips what is done.

The predictions file is JSONL, one line per mention (ARCHITECTURE.md "Predictions JSONL"). While a
run is in progress lines are in completion order; once every mention is done the file is rewritten
atomically in input order, whatever was resumed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from gemel.errors import DataError, GemelError
from gemel.types import BadMention, LinkResult, Mention

log = logging.getLogger(__name__)

LinkFn = Callable[[Sequence[Mention]], list[LinkResult]]


def read_done(path: Path) -> dict[str, dict]:
    """Predictions already written (a torn last line from a killed run is ignored)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                done[str(row["id"])] = row
    return done


def check_unique_ids(mentions: Sequence[Mention], source: str) -> None:
    seen: set[str] = set()
    for i, m in enumerate(mentions):
        if m.id in seen:
            raise DataError(f"duplicate mention id {m.id!r}: predictions are keyed by id",
                            path=source, record=i, field="id", fix="give every mention a unique id")
        seen.add(m.id)


def _link_isolating_errors(link: LinkFn, batch: Sequence[Mention]) -> list[LinkResult]:
    """Link a batch; if it fails, link its mentions one by one so one bad mention fails alone."""
    try:
        return link(batch)
    except (GemelError, OSError, ValueError) as err:
        if len(batch) == 1:
            return [LinkResult(batch[0].id, (), gold_id=batch[0].entity_id,
                               error=f"{type(err).__name__}: {err}")]
        log.warning("batch failed (%s); retrying its %d mentions one by one", err, len(batch))
        return [r for m in batch for r in _link_isolating_errors(link, [m])]


def run(link: LinkFn, mentions: Sequence[Mention], out: str | Path, *, batch_size: int = 4,
        progress: bool = True, source: str = "<mentions>") -> list[dict]:
    """Link every mention not yet in ``out``; return all prediction rows in input order."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_unique_ids(mentions, source)
    wanted = {m.id for m in mentions}
    done = {k: v for k, v in read_done(out).items() if k in wanted}
    todo = [m for m in mentions if m.id not in done]
    if done:
        log.info("resuming %s: %d of %d mentions already linked", out, len(done), len(mentions))
    # Start from the rows we keep (drops a torn line and rows of mentions no longer asked for).
    _write_rows(out, [done[m.id] for m in mentions if m.id in done])
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(mentions), initial=len(done),
                                                    disable=not progress, unit="mention") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            # records the reader could not read are error rows as they are, never linked
            results = [LinkResult(m.id, (), gold_id=m.entity_id, error=f"DataError: {m.error}")
                       for m in batch if isinstance(m, BadMention)]
            good = [m for m in batch if not isinstance(m, BadMention)]
            for result in results + (_link_isolating_errors(link, good) if good else []):
                row = result.to_json()
                done[result.mention_id] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    rows = [done[m.id] for m in mentions]
    _write_rows(out, rows)
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
