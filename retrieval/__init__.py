"""Demonstration retrieval for in-context entity linking (installed as ``gemel.retrieval``).

    retriever = get_retriever("simcse", field="mention").fit(train_mentions)
    demos = retriever.query(mention, k=16)                 # most similar first
    prompt_demos = order_demonstrations(demos)             # least similar first (GEMEL)

Names: ``simcse`` (the method: sentence embeddings, MiniLM by default), ``bm25`` (lexical,
bm25s), ``random`` (seeded), ``hybrid`` (weighted mix). A query never gets its own record (same
id) or any record with the same mention and sentence. Adding a retriever: docs/architecture.md
("Where to add").
"""
from gemel.retrieval.base import (FIELDS, Demonstration, ExclusionIndex, Retriever,
                                  ScoredRetriever, field_text, order_demonstrations)
from gemel.retrieval.dense import DenseIndex
from gemel.retrieval.encoder import SentenceEncoder
from gemel.retrieval.registry import get_retriever, register_retriever, retriever_names

__all__ = ["FIELDS", "Demonstration", "DenseIndex", "ExclusionIndex", "Retriever",
           "ScoredRetriever", "SentenceEncoder", "field_text", "get_retriever",
           "order_demonstrations", "register_retriever", "retriever_names"]
