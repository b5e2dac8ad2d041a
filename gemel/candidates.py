"""The candidate retriever: KB titles by dense similarity of the mention to "title: description".

It serves candidate-aware decoding (beyond GEMEL: the trie restricted, per mention, to the top-C
retrieved titles, so the LLM chooses among titles a retriever found; the retriever's recall@C
bounds H@1, so it is reported next to it) and the rerank stage (nearest titles in the pool, the
similarity features). The linker calls :meth:`CandidateRetriever.retrieve` once per batch and
hands the one :class:`Retrieved` to both; see docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gemel.kb import KnowledgeBase
from gemel.retrieval.base import field_text
from gemel.retrieval.dense import DenseIndex
from gemel.retrieval.encoder import SentenceEncoder
from gemel.types import Mention


def title_texts(kb: KnowledgeBase) -> list[str]:
    """One text per unique title (title index order): the title and its first entity's description."""
    out = []
    for i, title in enumerate(kb.titles):
        description = kb[kb.ids_for_title_index(i)[0]].description
        out.append(f"{title}: {description}" if description else title)
    return out


@dataclass
class Retrieved:
    """One batch's retrieval: the top titles of every mention, and the mentions' query vectors
    (by field) from which the similarity to any other title is read without embedding again."""

    titles: np.ndarray  # [n_mentions, C] title indices, best first
    scores: np.ndarray  # [n_mentions, C] their cosine similarities
    queries: dict[str, np.ndarray]  # field -> [n_mentions, dim] unit query vectors
    index: DenseIndex  # the KB titles' vectors

    def similarity(self, field: str, i: int, title_indices: Sequence[int]) -> np.ndarray:
        """Cosine similarity of mention ``i`` (as ``field``) to the given titles: [len(titles)]."""
        idx = np.asarray(title_indices, dtype=np.int64)
        rows = self.index.inverse[idx] if self.index.inverse is not None else idx
        return self.index.vectors[rows] @ self.queries[field][i]


class CandidateRetriever:
    """Top-C title indices per mention, by cosine similarity of sentence embeddings."""

    def __init__(self, kb: KnowledgeBase, model: str = "minilm-l6-v2", field: str = "mention",
                 encoder: SentenceEncoder | None = None):
        self.kb, self.field = kb, field
        self.encoder = encoder or SentenceEncoder(model)
        self.index = DenseIndex.build(title_texts(kb), self.encoder,
                                      extra={"use": "kb-candidates", "kb": kb.fingerprint})

    def retrieve(self, mentions: Sequence[Mention], c: int,
                 fields: Sequence[str] = ()) -> Retrieved:
        """The top-C titles of each mention (by the retriever's field), and the query vectors of
        ``fields`` too (each field's texts embedded once), for similarities read later."""
        queries = {f: self.index.vectors_for([field_text(m, f) for m in mentions])
                   for f in dict.fromkeys([self.field, *fields])}
        scores, rows = self.index.search(queries[self.field], c)
        return Retrieved(rows, scores, queries, self.index)

    def top(self, mentions: Sequence[Mention], c: int) -> tuple[np.ndarray, np.ndarray]:
        """(title indices [n, C], cosine similarities [n, C]), best first."""
        found = self.retrieve(mentions, c)
        return found.titles, found.scores
