"""Teacher-forced scoring as prefix trees: each distinct title prefix is run through the model once.

Scoring a prompt's titles one padded row each runs every shared prefix once per title ("Bell 407",
"Bell 429 GlobalRanger", "Bell pepper" all feed "Bell"), a terminator-merged title's two paths
(")" + "\\n" and ")\\n") twice, the terminator itself (whose successor nobody scores), and the
padding up to the longest title. Here a prompt's sequences become one tree: node = a distinct
proper prefix (its last token fed at its depth's position), attending to the prompt and to its
own ancestors only. On WikiDiverse fusion pools this feeds ~45 tokens per mention where padded
rows fed ~135 (Qwen2.5 tokenizer, 4 demonstrations, batch 4).

A tree with more than ``max_nodes`` nodes is split into several rows (sequences in sorted order,
so that rows keep shared prefixes together).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class TreeRow:
    """One model row: ``tokens[i]`` fed at answer depth ``depth[i]`` (0 = the first answer
    token), continuing node ``parent[i]`` (-1: the prompt itself)."""

    prompt: int
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)

    def ancestry(self, width: int) -> np.ndarray:
        """[width, width] bool: node i may attend to node j (j is i or one of its ancestors).
        Positions past the row's nodes (padding) attend to themselves only."""
        allowed = np.eye(width, dtype=bool)
        for i, p in enumerate(self.parent):  # parents come before their children
            if p >= 0:
                allowed[i, :i] = allowed[p, :i]
        return allowed


@dataclass
class ScorePlan:
    """Rows to run, and the (row, node, next token) log-probabilities that make each sequence.

    ``pairs[k] = (row, node, token)``: log p(token | prompt, node's prefix); ``sequence_pairs[(p,
    seq)]``: the pairs whose log-probabilities, with the prompt's first-token log-probability of
    ``seq[0]``, sum to ``seq``'s."""

    rows: list[TreeRow]
    pairs: list[tuple[int, int, int]]
    sequence_pairs: dict[tuple[int, tuple[int, ...]], list[int]]


def plan(sequences: Sequence[Sequence[Sequence[int]]], max_nodes: int = 256) -> ScorePlan:
    """``sequences[p]``: token sequences (non-empty) to score after prompt ``p``."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    rows: list[TreeRow] = []
    pairs: list[tuple[int, int, int]] = []
    pair_id: dict[tuple[int, int, int], int] = {}
    sequence_pairs: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for p, seqs in enumerate(sequences):
        row, index = None, {}  # index: prefix -> node in the current row
        for seq in sorted({tuple(s) for s in seqs}):
            if not seq:
                raise ValueError(f"prompt {p}: an empty sequence cannot be scored")
            new = [seq[:k] for k in range(1, len(seq)) if seq[:k] not in index]
            if row is None or (row.tokens and len(row.tokens) + len(new) > max_nodes):
                row, index = TreeRow(p), {}
                new = [seq[:k] for k in range(1, len(seq))]
            if new:
                if not row.tokens:
                    rows.append(row)
                for prefix in new:
                    index[prefix] = len(row.tokens)
                    row.tokens.append(prefix[-1])
                    row.depth.append(len(prefix) - 1)
                    row.parent.append(index.get(prefix[:-1], -1))
            r = len(rows) - 1
            ids = []
            for k in range(1, len(seq)):
                key = (r, index[seq[:k]], seq[k])
                if key not in pair_id:
                    pair_id[key] = len(pairs)
                    pairs.append(key)
                ids.append(pair_id[key])
            sequence_pairs[(p, seq)] = ids
    return ScorePlan(rows, pairs, sequence_pairs)


def passes(rows: Sequence[TreeRow], max_tokens: int) -> list[list[int]]:
    """Row indices grouped into model calls, rows of similar size together, each call at most
    ``max_tokens`` positions (rows x its longest row) unless one row alone is longer."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens))
    out: list[list[int]] = []
    for r in order:
        if out and (len(out[-1]) + 1) * len(rows[r].tokens) <= max_tokens:
            out[-1].append(r)
        else:
            out.append([r])
    return out
