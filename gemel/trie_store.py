"""The entity trie of a KB for one tokenizer and template: its identity, built once, cached on disk
by that identity (<gemel cache>/tries/<key>), and checked on load (a mismatch is refused with the
fix). The linker, training and `gemel build-trie` get their tries here; see docs/architecture.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from gemel.data.nil import NIL
from gemel.errors import MismatchError
from gemel.kb import KnowledgeBase
from gemel.sources import cache_dir
from gemel.title_tokens import tokenizer_identity
from gemel.trie import EntityTrie

log = logging.getLogger(__name__)


def trie_identity(kb: KnowledgeBase, tokenizer, answer_prefix: str, terminator: str,
                  nil: bool = False) -> dict:
    identity = {"tokenizer": tokenizer_identity(tokenizer), "kb_fingerprint": kb.fingerprint,
                "answer_prefix": answer_prefix, "terminator_text": terminator}
    if nil:  # only then: tries built before NIL mode existed stay valid
        identity["nil_answer"] = NIL
    return identity


def load_or_build_trie(kb: KnowledgeBase, tokenizer, answer_prefix: str, terminator: str,
                       path: str | Path | None = None, nil: bool = False) -> EntityTrie:
    """Load a saved trie (checking it fits this KB, tokenizer and template) or build and cache one.
    ``nil``: the trie also holds the reserved answer "NIL", as title index ``len(kb.titles)``."""
    expect = trie_identity(kb, tokenizer, answer_prefix, terminator, nil)
    if path is not None:
        return EntityTrie.load(path, expect=expect)
    key = hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "tries" / key
    if folder.exists():
        try:
            return EntityTrie.load(folder, expect=expect)
        except (MismatchError, OSError, ValueError) as err:  # stale or half-written: rebuild
            log.warning("rebuilding cached trie %s: %s", folder, err)
    trie = build_trie(kb, tokenizer, answer_prefix, terminator, nil)
    trie.save(folder)
    return trie


def build_trie(kb: KnowledgeBase, tokenizer, answer_prefix: str, terminator: str,
               nil: bool = False) -> EntityTrie:
    titles = list(kb.titles) + ([NIL] if nil else [])
    trie = EntityTrie.from_titles(titles, tokenizer, answer_prefix, terminator,
                                  kb_fingerprint=kb.fingerprint)
    trie.meta.update(trie_identity(kb, tokenizer, answer_prefix, terminator, nil))
    return trie


__all__ = ["build_trie", "load_or_build_trie", "trie_identity"]
