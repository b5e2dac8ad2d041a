"""Candidate-aware decoding (beyond GEMEL): restrict the trie, per mention, to the top-C KB titles
retrieved for it by dense similarity of the mention to "title: description".

The LLM then reads the context and chooses among titles a retriever found; the retriever's
recall@C bounds H@1, so it is reported next to it.
"""
from __future__ import annotations

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


class CandidateRetriever:
    """Top-C title indices per mention, by cosine similarity of sentence embeddings."""

    def __init__(self, kb: KnowledgeBase, model: str = "minilm-l6-v2", field: str = "mention",
                 encoder: SentenceEncoder | None = None):
        self.kb, self.field = kb, field
        self.encoder = encoder or SentenceEncoder(model)
        self.index = DenseIndex.build(title_texts(kb), self.encoder,
                                      extra={"use": "kb-candidates", "kb": kb.fingerprint})

    def top(self, mentions: Sequence[Mention], c: int) -> tuple[np.ndarray, np.ndarray]:
        """(title indices [n, C], cosine similarities [n, C]), best first."""
        scores, rows = self.index.search_texts([field_text(m, self.field) for m in mentions], c)
        return rows, scores

    def similarity(self, mentions: Sequence[Mention], title_indices: Sequence[Sequence[int]],
                   field: str | None = None) -> list[np.ndarray]:
        """Cosine similarity of each mention (as ``field``, default the retriever's) to the given
        titles, for score fusion: one array [len(title_indices[i])] per mention."""
        q = self.index.vectors_for([field_text(m, field or self.field) for m in mentions])
        return [self.index.vectors[self._rows(idx)] @ q[i] for i, idx in enumerate(title_indices)]

    def _rows(self, title_indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(title_indices, dtype=np.int64)
        return self.index.inverse[idx] if self.index.inverse is not None else idx
