"""Resumable batch runs: predictions are appended as they are made, a rerun skips what is done.

The predictions file is JSONL, one line per mention (docs/architecture.md "Predictions JSONL").
While a run is in progress lines are in completion order; once every mention is done the file is
rewritten atomically in input order, whatever was resumed.

Files are sacred: an output is written only when it is absent, empty, or a predictions file of the
same run — recognised by its sidecar ``<out>.run.json`` (what was linked: the input's hash; with
which settings that change results; the gemel version). Anything else is refused before any work.
Rows are appended per batch with flush + fsync (a ``kill -9`` tears at most the last line, which a
resume drops), the final rewrite is atomic, and ``<out>.lock`` keeps a second writer out. A rerun
with fewer mentions (a narrower ``--limit``) keeps the rows it does not ask for; a rerun links again
what is missing *and* what ended as an error row (the cause may have been fixed).

Batches are fixed slices of the input (mentions ``[i*B, (i+1)*B)``), and a slice with any mention
missing is linked again whole: a resumed run puts every mention in the same batch as an
uninterrupted one, so its predictions are the same (padding never differs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from gemel.errors import DataError, GemelError
from gemel.files import append_lines, file_sha256, hold_lock, write_atomic
from gemel.types import BadMention, LinkResult, Mention

log = logging.getLogger(__name__)

LinkFn = Callable[[Sequence[Mention]], list[LinkResult]]
SIDECAR_FORMAT = "gemel-predictions"
# LinkerConfig fields that do not change what is predicted (only how fast, or where)
RESULT_NEUTRAL = ("device", "batch_size", "feature_cache", "trie")
# LinkerConfig fields renamed after runs were written (gemel.linker.RENAMED): a run's identity
# keeps the old name, so that those runs still resume
IDENTITY_NAMES = {"num_candidates": "candidates"}


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".run.json")


# -- what a run is -------------------------------------------------------------------------------
def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's weights and configs (``*.safetensors``, ``*.json``)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json"):
            h.update(f"{p.relative_to(path).as_posix()}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def input_identity(path: str | Path, fmt: str = "auto", split: str | None = None,
                   splits_path: str | Path | None = None) -> dict:
    """What a mentions input is: its bytes and the split selected from it (not ``--limit``:
    a narrower or wider limit reads the same input, and resumes)."""
    return {"sha256": file_sha256(path), "format": fmt, "split": split,
            "splits_sha256": file_sha256(splits_path) if splits_path else None}


def settings_identity(config, **extra) -> dict:
    """The settings of a :class:`~gemel.linker.LinkerConfig` that change predictions and differ
    from their defaults (so that a field added to the config in a later gemel, at a default that
    keeps the old behaviour, does not block resuming older runs); files they name (fusion model,
    mapper) by content, so moving a file does not block a resume either."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    settings = {IDENTITY_NAMES.get(k, k): v for k, v in dataclasses.asdict(config).items()
                if k not in RESULT_NEUTRAL and v != defaults[k]}
    for key in ("fusion", "mapper"):
        if settings.get(key):
            settings[key] = {"sha256": path_sha256(settings[key])}
    settings.update(extra)
    return settings


def _normal(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} in the file, {json.dumps(b)} now")
    return out


# -- the output file -----------------------------------------------------------------------------
def check_output(out: str | Path, identity: dict) -> bool:
    """Refuse ``out`` unless it is absent, empty, or a predictions file of this run.
    Returns True when there is something to resume."""
    out = Path(out)
    if out.is_dir():
        raise GemelError(f"--out {out} is a folder; give a file name such as {out / 'pred.jsonl'}")
    if not out.exists() or out.stat().st_size == 0:
        return False
    side = sidecar_path(out)
    move = (f"choose another --out, or move {out} away if you mean to replace it "
            "(gemel writes --out only when it is absent, empty, or its own predictions of the "
            "same input and settings)")
    if not side.is_file():
        raise GemelError(f"--out {out} exists and is not a gemel predictions file (no {side.name} "
                         f"beside it): not touching it; {move}")
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GemelError(f"--out {out}: cannot read its sidecar {side} ({err}): not touching "
                         f"it; {move}") from err
    if not isinstance(saved, dict) or saved.get("format") != SIDECAR_FORMAT:
        raise GemelError(f"--out {out}: {side} is not a gemel run sidecar; {move}")
    diff = _differences(saved.get("identity", {}), _normal(identity))
    if diff:
        raise GemelError(f"--out {out} holds predictions of another run, so resuming it would mix "
                         "them: " + "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "")
                         + f". Rerun with the same input and settings to resume, or {move}")
    from gemel import __version__

    if saved.get("gemel_version") != __version__:
        log.warning("%s was written by gemel %s; resuming with gemel %s", out,
                    saved.get("gemel_version"), __version__)
    return True


class Output:
    """A predictions file held (locked) by this process for one run; see :func:`open_output`."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity


@contextmanager
def open_output(out: str | Path, identity: dict | None = None,
                about: dict | None = None) -> Iterator[Output]:
    """Check ``out`` (see :func:`check_output`), lock it, record the run in its sidecar.
    Nothing is written when the check fails; call this after every argument is validated.
    ``about``: what made the predictions without deciding whether a run may resume them (the
    model, the resolved dtype, the CPU flags ...), kept in the sidecar for reports; a resumed
    run's replaces the earlier one's."""
    out, identity = Path(out), _normal(identity or {})
    check_output(out, identity)
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(out, "these predictions"):
        check_output(out, identity)  # again under the lock: another writer may have just finished
        from gemel import __version__

        side = {"format": SIDECAR_FORMAT, "gemel_version": __version__, "identity": identity}
        if about:
            side["about"] = _normal(about)
        timing = _read_timing(out)  # a resumed run adds to the time its earlier runs took
        if timing:
            side["timing"] = timing
        write_atomic(sidecar_path(out), json.dumps(side, indent=1) + "\n")
        yield Output(out, identity)


def _read_timing(out: Path) -> dict | None:
    """``{"seconds", "linked"}`` the sidecar of ``out`` has counted so far (None: none yet)."""
    try:
        saved = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    timing = saved.get("timing") if isinstance(saved, dict) else None
    return timing if isinstance(timing, dict) else None


def add_timing(out: Path, seconds: float, linked: int) -> None:
    """Add a batch's linking wall time and mention count to the sidecar's ``timing``: what the
    run took in all, over every resume (reports quote it). A file without a sidecar is left
    alone."""
    side = sidecar_path(out)
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    timing = saved.get("timing") or {"seconds": 0.0, "linked": 0}
    saved["timing"] = {"seconds": round(timing["seconds"] + seconds, 3),
                       "linked": timing["linked"] + linked}
    write_atomic(side, json.dumps(saved, indent=1) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    """Prediction rows in file order. A torn last line (a killed run) is dropped; any other line
    that is not a JSON object with an ``id`` is an error (the file is not ours, or damaged)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[list[dict], bool]:
    """(rows, clean): clean when every line is a whole row (nothing torn, no blank line)."""
    if not path.exists():
        return [], True
    rows: list[dict] = []
    clean = True
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
            clean = clean and line.endswith("\n")
        elif n == len(lines) and not line.endswith("\n"):
            log.warning("%s: dropping a torn last line (a run was killed while writing it)", path)
            clean = False
        elif line.strip():
            raise DataError("not a prediction row (a JSON object with an 'id')", path=path,
                            record=f"line {n}", fix="restore the file, or link into a new --out")
        else:
            clean = False
    return rows, clean


def read_done(path: str | Path) -> dict[str, dict]:
    """Predictions already written, by mention id (for an id written twice, the later row)."""
    return {str(r["id"]): r for r in read_rows(path)}


def check_unique_ids(mentions: Sequence[Mention], source: str) -> None:
    seen: set[str] = set()
    for i, m in enumerate(mentions):
        if m.id in seen:
            raise DataError(f"duplicate mention id {m.id!r}: predictions are keyed by id",
                            path=source, record=i, field="id", fix="give every mention a unique id")
        seen.add(m.id)


def _link_isolating_errors(link: LinkFn, batch: Sequence[Mention]) -> list[LinkResult]:
    """Link a batch; if it fails, link its mentions one by one so one bad mention fails alone.
    Records the reader could not read (:class:`BadMention`) are error rows as they are."""
    if any(isinstance(m, BadMention) for m in batch):
        good = [m for m in batch if not isinstance(m, BadMention)]
        linked = {r.mention_id: r for r in (_link_isolating_errors(link, good) if good else [])}
        return [linked[m.id] if not isinstance(m, BadMention) else
                LinkResult(m.id, (), gold_id=m.entity_id, error=f"DataError: {m.error}")
                for m in batch]
    try:
        return link(batch)
    except (GemelError, OSError, ValueError) as err:
        if len(batch) == 1:
            return [LinkResult(batch[0].id, (), gold_id=batch[0].entity_id,
                               error=f"{type(err).__name__}: {err}")]
        log.warning("batch failed (%s); retrying its %d mentions one by one", err, len(batch))
        return [r for m in batch for r in _link_isolating_errors(link, [m])]


def _lines(rows: Sequence[dict]) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) for row in rows]


def run(link: LinkFn, mentions: Sequence[Mention], out: str | Path | Output, *,
        batch_size: int = 4, progress: bool = True, source: str = "<mentions>",
        identity: dict | None = None) -> list[dict]:
    """Link every mention not yet in ``out``; return their prediction rows in input order.

    ``out``: a path (checked and locked here with ``identity``, see :func:`open_output`) or an
    :class:`Output` already opened by the caller."""
    if batch_size < 1:
        raise GemelError(f"batch_size={batch_size} must be at least 1")
    check_unique_ids(mentions, source)
    if not isinstance(out, Output):
        with open_output(out, identity) as held:
            return _run(link, mentions, held.path, batch_size, progress)
    return _run(link, mentions, out.path, batch_size, progress)


def _run(link: LinkFn, mentions: Sequence[Mention], path: Path, batch_size: int,
         progress: bool) -> list[dict]:
    existing, clean = _read(path)
    done = {str(r["id"]): r for r in existing}
    if not clean or len(done) != len(existing):
        # start from whole lines, each id once (a kill may have torn the last one)
        write_atomic(path, "".join(x + "\n" for x in _lines(list(done.values()))))
    wanted = {m.id for m in mentions}
    ok = lambda m: m.id in done and not done[m.id].get("error")  # noqa: E731
    chunks = [mentions[i:i + batch_size] for i in range(0, len(mentions), batch_size)]
    todo = [c for c in chunks if not all(ok(m) for m in c)]
    n_done = sum(ok(m) for m in mentions)
    if n_done:
        log.info("resuming %s: %d of %d mentions already linked", path, n_done, len(mentions))
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(mentions), initial=n_done,
                                                     disable=not progress, unit="mention") as bar:
        for chunk in todo:
            fresh = sum(not ok(m) for m in chunk)
            began = time.perf_counter()
            rows = [r.to_json() for r in _link_isolating_errors(link, chunk)]
            append_lines(f, _lines(rows))
            add_timing(path, time.perf_counter() - began, fresh)
            done.update((str(r["id"]), r) for r in rows)
            bar.update(fresh)
    # input order; rows of mentions this run did not ask for (a wider earlier run) stay, after
    others = [r for i, r in done.items() if i not in wanted]
    rows = [done[m.id] for m in mentions]
    write_atomic(path, "".join(x + "\n" for x in _lines(rows + others)))
    return rows


# -- the end of a run -------------------------------------------------------------------------
def error_summary(rows: Sequence[dict], first: int = 3) -> str | None:
    """None when no row is an error; else how many, and the first few messages."""
    errors = [r for r in rows if r.get("error")]
    if not errors:
        return None
    lines = [f"{len(errors)} of {len(rows)} mentions ended as error rows (\"error\" set, no "
             "candidates); a rerun links them again:"]
    lines += [f"  {r['id']}: {r['error']}" for r in errors[:first]]
    if len(errors) > first:
        lines.append(f"  ... and {len(errors) - first} more")
    return "\n".join(lines)


__all__ = ["run", "read_done", "read_rows", "open_output", "check_output", "Output",
           "input_identity", "settings_identity", "sidecar_path", "error_summary",
           "check_unique_ids", "path_sha256"]


# -- shards ------------------------------------------------------------------------------------
def shard_of(mention_id: str, n: int) -> int:
    """The shard (0 .. n-1) a mention id falls in: a stable hash (blake2b), the same in every
    process, machine and Python run (unlike ``hash()``)."""
    digest = hashlib.blake2b(mention_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def select_shard(mentions: Sequence[Mention], shard: tuple[int, int] | None) -> list[Mention]:
    """The mentions of shard ``(i, n)``, in input order (all of them for None)."""
    if shard is None:
        return list(mentions)
    i, n = shard
    return [m for m in mentions if shard_of(m.id, n) == i]


def shard_part_path(out: str | Path, shard: tuple[int, int]) -> Path:
    """Where process ``i`` of ``n`` writes its part of ``out``: ``pred.shard-0-of-2.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{shard[0]}-of-{shard[1]}{out.suffix or '.jsonl'}")


def part_identity(part: str | Path) -> dict:
    """The run identity a part's sidecar records (a part without one is refused)."""
    side = sidecar_path(part)
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GemelError(f"{part}: not a gemel predictions part (cannot read {side}: {err}); "
                         "merge the files that `gemel link --shard i/n` wrote") from err
    if not isinstance(saved, dict) or saved.get("format") != SIDECAR_FORMAT:
        raise GemelError(f"{part}: {side} is not a gemel run sidecar")
    return saved.get("identity", {})


def merge_parts(parts: Sequence[str | Path], mentions: Sequence[Mention], out: str | Path | Output,
                *, identity: dict | None = None, source: str = "<mentions>") -> list[dict]:
    """Join shard parts into one predictions file in input order, each mention exactly once.

    Refuses a mention in two parts (an overlap), a mention in none (a gap: a shard not linked or
    not finished), and parts of different runs (their sidecars disagree on anything but the
    shard, or with ``identity["input"]`` when given). Rows of ids not in ``mentions`` (a part
    linked with a wider ``--limit``) are left out, with a warning. Returns the rows written."""
    check_unique_ids(mentions, source)
    parts = [Path(p) for p in parts]
    if not parts:
        raise GemelError("merge needs at least one part")
    ids = [part_identity(p) for p in parts]
    base = {k: v for k, v in ids[0].items() if k != "shard"}
    for p, ident in zip(parts[1:], ids[1:]):
        diff = _differences(base, {k: v for k, v in ident.items() if k != "shard"})
        if diff:
            raise GemelError(f"{p} and {parts[0]} are parts of different runs: "
                             + "; ".join(diff[:4]) + "; merge parts of one run")
    shards = [tuple(i["shard"]) for i in ids if i.get("shard")]
    if len(set(shards)) != len(shards):
        raise GemelError(f"two parts are the same shard ({sorted(shards)}); give each part once")
    if identity is not None and "input" in base:
        diff = _differences(base["input"], _normal(identity.get("input", {})))
        if diff:
            raise GemelError("the parts were linked from another input than --data: "
                             + "; ".join(diff[:4]) + "; give merge the --data (and --format, "
                             "--split, --splits) the parts were linked from")
    wanted = {m.id for m in mentions}
    part_of: dict[str, Path] = {}  # mention id -> the part holding it
    rows: dict[str, dict] = {}
    overlaps, extra = [], []
    for p in parts:
        if not p.is_file():
            raise GemelError(f"part {p} does not exist")
        for i, row in read_done(p).items():
            if i not in wanted:
                extra.append((i, p))
            elif i in part_of:
                overlaps.append(f"{i!r} in {part_of[i]} and {p}")
            else:
                part_of[i], rows[i] = p, row
    if overlaps:
        raise GemelError(f"{len(overlaps)} mention(s) are in more than one part, e.g. "
                         + "; ".join(overlaps[:3]) + ": parts of one `--shard i/n` split never "
                         "overlap; merge the parts of one split only")
    missing = [m.id for m in mentions if m.id not in rows]
    if missing:
        raise GemelError(f"{len(missing)} of {len(mentions)} mentions are in no part, e.g. "
                         f"{missing[:5]}: link the missing shard(s) (`gemel link --shard i/n` "
                         "resumes an unfinished part), or give merge the same --limit/--split "
                         "as the parts")
    if extra:
        log.warning("%d row(s) of the parts are not mentions of %s (e.g. %r in %s): left out",
                    len(extra), source, extra[0][0], extra[0][1])
    ordered = [rows[m.id] for m in mentions]
    merged = dict(base, shard=None)

    def write(path: Path) -> None:
        write_atomic(path, "".join(x + "\n" for x in _lines(ordered)))

    if isinstance(out, Output):
        write(out.path)
    else:
        with open_output(out, merged) as held:
            write(held.path)
    return ordered
