"""Entity titles as token ids: exactly the tokens a model emits for a title after the template's
answer prefix, up to the terminator (what the entity trie is built from; docs/architecture.md).

Two boundaries need care. The title's first tokens may merge with the answer prefix (SentencePiece
and byte-level BPEs treat the leading space differently): such a title is tokenized alone and
reported. Its last characters may merge with the terminator text (Qwen2.5's byte-level BPE has
``")\n"``): such a title keeps its own tokens (then the terminator) and, beside them, its
*natural path* ending in the merged token, since the model ends a title as its demonstrations
showed it. Batched through the tokenizer's Rust fast path where it gives the same ids.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gemel.errors import DataError

log = logging.getLogger(__name__)


def tokenizer_identity(tokenizer) -> dict:
    """What makes token ids mean the same thing: name, vocabulary size and a hash of the vocab.

    ``vocab_sha256`` is the part that matters; ``name_or_path`` makes a mismatch readable.
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
            "vocab_size": len(vocab), "vocab_sha256": digest.hexdigest()[:16]}


@dataclass
class TokenizedTitles:
    """Titles as the model emits them after the answer prefix, concatenated (no terminator),
    and the natural paths of the titles whose last token merges with the terminator text."""

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n + 1]: title i is tokens[offsets[i]:offsets[i + 1]]
    terminator: int
    terminator_text: str
    boundary_merged: list[int] = field(default_factory=list)  # title indices
    terminator_merged: list[int] = field(default_factory=list)
    # natural_paths[j]: the tokens after the prefix of `prefix + title + terminator_text`, up to
    # the token merged with the terminator, for title terminator_merged[j]
    natural_paths: list[list[int]] = field(default_factory=list)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batch_encoder(tokenizer, probe: list[str]):
    """The fastest batch encoder that gives ``tokenizer(texts)``'s ids: a fast tokenizer's Rust
    ``encode_batch_fast`` (no offsets; ~1.7x faster) if it agrees on ``probe``, else the call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if fast is not None:
        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        try:
            if encode(probe) == _encode(tokenizer, probe):
                return encode
        except (TypeError, ValueError):  # another backend signature: use the plain call
            pass
    return lambda texts: _encode(tokenizer, texts)


def resolve_terminator(tokenizer, answer_prefix: str,
                       terminator: int | str) -> tuple[int, list[int]]:
    """(terminator id, tokens of the terminator text in context after an answer).

    A string is tokenized after ``answer_prefix + "x"``; its first token there is the terminator
    (for a one-token text such as ``"\\n"``, the last token of the encoding, which must decode
    back to the text). An int is taken as the id; its context is itself.
    """
    if not isinstance(terminator, str):
        term = int(terminator)
        if not 0 <= term < len(tokenizer):
            raise DataError(f"terminator id {term} is outside the vocabulary "
                            f"(0..{len(tokenizer) - 1})", field="terminator",
                            fix="pass a token id of this tokenizer")
        return term, [term]
    if not terminator:
        raise DataError("empty terminator text", field="terminator",
                        fix="pass the text the template puts after the answer, e.g. '\\n'")
    base = _encode(tokenizer, [answer_prefix + "x"])[0]
    full = _encode(tokenizer, [answer_prefix + "x" + terminator])[0]
    tail = full[len(base):]
    if full[:len(base)] != base or not tail:
        raise DataError(f"the terminator text {terminator!r} merges with the answer's last token "
                        "when tokenized", field="terminator",
                        fix="pass the terminator as a token id instead")
    if len(tail) == 1 and tokenizer.decode(tail) != terminator:
        raise DataError(f"the terminator text {terminator!r} tokenizes to {tail} which decodes to "
                        f"{tokenizer.decode(tail)!r}", field="terminator",
                        fix="pass the terminator as a token id instead")
    return int(tail[0]), [int(t) for t in tail]


def tokenize_titles(titles: Sequence[str], tokenizer, answer_prefix: str,
                    terminator: int | str = "\n", batch_size: int = 32768) -> TokenizedTitles:
    """Tokenize ``answer_prefix + title + terminator_text`` for every title (batched) and keep the
    title's part: exactly the tokens the model emits after the prefix in a demonstration.

    Falls back, and reports, where a merge crosses a boundary: with the prefix (the title is
    tokenized alone) or with the terminator text (the title's own tokens, then the terminator;
    the natural, merged path is kept beside them in ``natural_paths``).
    """
    term, tail = resolve_terminator(tokenizer, answer_prefix, terminator)
    term_text = terminator if isinstance(terminator, str) else tokenizer.decode([term])
    suffix = term_text if isinstance(terminator, str) else ""
    if not suffix:
        tail = []  # an id terminator: tokenize the title alone after the prefix, then add it
    else:
        _refuse_terminator_text(titles, suffix)
    edges = _Edges(answer_prefix, _encode(tokenizer, [answer_prefix])[0] if answer_prefix else [],
                   suffix, tail, term)
    out = TokenizedTitles(np.zeros(0, np.int32), np.zeros(1, np.int64), term, term_text)
    toks, lens = [], []
    encode = _batch_encoder(tokenizer, [answer_prefix + str(t) + suffix for t in titles[:64]])
    for lo in range(0, len(titles), batch_size):
        chunk = [str(t) for t in titles[lo:lo + batch_size]]
        tokens, lengths, fixed = _tokenize_chunk(tokenizer, encode, chunk, edges)
        for b, path, in_prefix in fixed:
            if in_prefix:
                out.boundary_merged.append(lo + b)
            if path is not None:
                out.terminator_merged.append(lo + b)
                out.natural_paths.append(path)
        toks.append(tokens)
        lens.append(lengths)
    out.tokens = np.concatenate(toks) if toks else out.tokens
    out.offsets = lengths_to_offsets(np.concatenate(lens) if lens else np.zeros(0, np.int64))
    _report_merges(titles, out, answer_prefix)
    return out


@dataclass(frozen=True)
class _Edges:
    """What surrounds a title in ``prefix + title + suffix``: the texts and their tokens."""

    prefix: str
    pre: list[int]  # the prefix's tokens
    suffix: str  # the terminator text ("" for a terminator given as an id)
    tail: list[int]  # the terminator text's tokens in context after an answer ([] for an id)
    term: int  # the terminator id


def _refuse_terminator_text(titles: Sequence[str], suffix: str) -> None:
    """A title holding the terminator text would end early in every demonstration."""
    for i, t in enumerate(titles):
        if suffix in str(t):
            raise DataError(f"title {str(t)!r} contains the terminator text {suffix!r}",
                            record=i, field="title", fix="remove it from the title (a "
                            "generated answer ends at the terminator) or choose another "
                            "terminator")


def _tokenize_chunk(tokenizer, encode, chunk: list[str], edges: _Edges
                    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[int] | None, bool]]]:
    """One batch of titles -> (tokens int32 [total], lengths int64 [n], and per title that
    crosses a boundary: (its position in ``chunk``, its natural path or None, whether it merges
    with the prefix))."""
    ids = encode([edges.prefix + t + edges.suffix for t in chunk])
    length = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(length.sum()))
    start = lengths_to_offsets(length)
    lp, lt = len(edges.pre), len(edges.tail)
    ok_pre, ok_term = _edges_intact(flat, start, length, edges)
    good = ok_pre & ok_term
    # keep, per good row, the tokens between the prefix and the terminator text
    row_len = np.repeat(length, length)
    pos = np.arange(len(flat)) - np.repeat(start[:-1], length)
    keep = (pos >= lp) & (pos < row_len - lt) & np.repeat(good, length)
    out, out_len = flat[keep], np.where(good, length - lp - lt, 0)
    del row_len, pos, keep, flat
    bad = np.flatnonzero(~good)
    if not len(bad):
        return out.astype(np.int32), out_len, []
    fixed = _boundary_paths(tokenizer, edges.prefix, [chunk[b] for b in bad],
                            [ids[b] for b in bad], ok_pre[bad].tolist(), edges.pre,
                            edges.suffix, edges.tail, edges.term)
    for b, (seq, _, _) in zip(bad.tolist(), fixed):
        out_len[b] = len(seq)
    sizes = [len(f[0]) for f in fixed]
    where = np.repeat(lengths_to_offsets(out_len)[bad] - np.concatenate(
        [[0], np.cumsum(sizes)[:-1]]), sizes)
    out = np.insert(out, where, np.fromiter((t for f in fixed for t in f[0]), np.int64))
    return (out.astype(np.int32), out_len,
            [(b, path, in_prefix) for b, (_, path, in_prefix) in zip(bad.tolist(), fixed)])


def _edges_intact(flat: np.ndarray, start: np.ndarray, length: np.ndarray,
                  edges: _Edges) -> tuple[np.ndarray, np.ndarray]:
    """Per encoded row (``flat[start[i]:start[i + 1]]``, ``length`` [n]): bool [n] whether it
    begins with the prefix's own tokens, and bool [n] whether it ends with the terminator
    text's (no merge across either boundary)."""
    lp, lt = len(edges.pre), len(edges.tail)
    ok = length >= lp + lt
    last = max(len(flat) - 1, 0)
    ok_pre = ok_term = ok
    if lp:
        got = flat[np.minimum(start[:-1, None] + np.arange(lp), last)] if len(flat) else None
        ok_pre = ok & ((got == np.asarray(edges.pre, np.int64)).all(1) if got is not None
                       else False)
    if lt:
        ends = np.clip(start[1:, None] - lt + np.arange(lt), 0, last)
        got = flat[ends] if len(flat) else None
        ok_term = ok & ((got == np.asarray(edges.tail, np.int64)).all(1) if got is not None
                        else False)
    return ok_pre, ok_term


def _report_merges(titles: Sequence[str], tok: TokenizedTitles, answer_prefix: str) -> None:
    if tok.boundary_merged:
        log.warning("entity trie: %d title(s) merge with the answer prefix %r when tokenized; "
                    "they are tokenized alone (e.g. %r)", len(tok.boundary_merged), answer_prefix,
                    [titles[i] for i in tok.boundary_merged[:3]])
    if tok.terminator_merged:
        log.info("entity trie: %d title(s) merge their last characters with the terminator text "
                 "%r; they end either way, merged or with the terminator token (e.g. %r)",
                 len(tok.terminator_merged), tok.terminator_text,
                 [titles[i] for i in tok.terminator_merged[:3]])


def _boundary_paths(tokenizer, prefix: str, titles: list[str], in_context: list[list[int]],
                    prefix_ok: list[bool], pre: list[int], suffix: str, tail: list[int],
                    term: int) -> list[tuple[list[int], list[int] | None, bool]]:
    """Per title whose encoding crosses a boundary: (its own tokens, its natural path where it
    merges with the terminator text or None, whether it merges with the prefix).

    ``in_context``: the encodings of ``prefix + title + suffix``. A title that merges with the
    prefix is read alone (``title + suffix``); its own tokens come from ``prefix + title``, or
    from the title alone. Batched: one tokenizer call per kind."""
    lp, lt = len(pre), len(tail)
    context = [row[lp:] for row in in_context]
    alone = [i for i, ok in enumerate(prefix_ok) if not ok]
    if alone:
        for i, row in zip(alone, _encode(tokenizer, [titles[i] + suffix for i in alone])):
            context[i] = row
    with_prefix = _encode(tokenizer, [prefix + t for t in titles])
    out = []
    for i, row in enumerate(context):
        if not lt or (len(row) >= lt and row[len(row) - lt:] == tail):  # only the prefix merges
            out.append((row[:len(row) - lt], None, True))
            continue
        in_prefix = not prefix_ok[i] or with_prefix[i][:lp] != pre
        own = _encode(tokenizer, [titles[i]])[0] if in_prefix else with_prefix[i][lp:]
        path = _natural_path(row, tail, term)
        out.append((own, path if path and path != own + [term] else None, in_prefix))
    return out


def _natural_path(tokens: list[int], tail: list[int], term: int) -> list[int]:
    """The tokens of ``title + terminator_text`` (``tokens``) up to the one that starts the
    terminator text: drop the trailing tokens that are the terminator text's own (its tokens
    ``tail`` after its first, whose text the merged token took), and stop at a terminator."""
    drop = 0
    while drop < len(tail) - 1 and drop < len(tokens) and tokens[-1 - drop] == tail[-1 - drop]:
        drop += 1
    path = tokens[:len(tokens) - drop]
    return path[:path.index(term) + 1] if term in path else path


def lengths_to_offsets(lengths: np.ndarray) -> np.ndarray:
    """Lengths int [n] -> offsets int64 [n + 1]: item i spans ``offsets[i]:offsets[i + 1]``."""
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


__all__ = ["TokenizedTitles", "lengths_to_offsets", "resolve_terminator", "tokenize_titles",
           "tokenizer_identity"]
