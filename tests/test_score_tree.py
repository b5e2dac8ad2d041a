"""Teacher-forced scoring by prefix trees (gemel.backends.score_tree) and its HF implementation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gemel.backends import score_tree
from tests.conftest import TITLES, tiny_llama
from tests.test_backend_hf import TEXTS, full_forward_scores, make_linker, mention

SEQS = [[[5, 6, 7, 2], [5, 6, 8, 2], [5, 6, 7], [9], [5, 6, 7, 2]],  # shared "5 6", a duplicate
        [[3, 2], [3, 4, 2], [9]]]


def prefix_of(row: score_tree.TreeRow, node: int) -> tuple[int, ...]:
    out = []
    while node >= 0:
        out.append(row.tokens[node])
        node = row.parent[node]
    return tuple(reversed(out))


def check_plan(sequences, todo: score_tree.ScorePlan) -> None:
    """Every sequence is its first token + its pairs' tokens, each pair's node the prefix before
    that token, all in one row of the sequence's prompt."""
    for (p, seq), ids in todo.sequence_pairs.items():
        assert len(ids) == len(seq) - 1
        rows = {todo.pairs[k][0] for k in ids}
        assert len(rows) <= 1
        for k, pair in zip(range(1, len(seq)), ids):
            r, node, token = todo.pairs[pair]
            assert todo.rows[r].prompt == p
            assert token == seq[k]
            assert prefix_of(todo.rows[r], node) == tuple(seq[:k])
            assert todo.rows[r].depth[node] == k - 1
    assert {key for key in todo.sequence_pairs} == {(p, tuple(s)) for p, ss in
                                                    enumerate(sequences) for s in ss}


def test_each_prefix_runs_once():
    todo = score_tree.plan(SEQS)
    check_plan(SEQS, todo)
    assert len(todo.rows) == 2  # one tree per prompt
    # prompt 0: prefixes 5 / 5 6 / 5 6 7 / 5 6 8 (not the terminators, not "9" alone)
    assert sorted(prefix_of(todo.rows[0], i) for i in range(len(todo.rows[0].tokens))) == [
        (5,), (5, 6), (5, 6, 7), (5, 6, 8)]
    assert len(todo.rows[1].tokens) == 2  # "3" and "3 4"; no node for "9"
    assert todo.sequence_pairs[(0, (9,))] == []
    # "5 6 7" and "5 6 7 2" share their pairs up to 7
    assert todo.sequence_pairs[(0, (5, 6, 7, 2))][:2] == todo.sequence_pairs[(0, (5, 6, 7))]
    assert len(set(todo.pairs)) == len(todo.pairs)


@pytest.mark.parametrize("max_nodes", [1, 2, 3, 5])
def test_rows_split_at_max_nodes(max_nodes):
    seqs = [[[1, 2, 3, 4], [1, 2, 5], [6, 7], [6, 8, 9], [10]], [[1, 2, 3, 4]]]
    todo = score_tree.plan(seqs, max_nodes=max_nodes)
    check_plan(seqs, todo)
    longest = max(len(s) - 1 for ss in seqs for s in ss)
    assert all(len(r.tokens) <= max(max_nodes, longest) for r in todo.rows)
    assert all(r.tokens for r in todo.rows)
    if max_nodes == 1:
        assert len(todo.rows) > 2


def test_ancestry_is_each_nodes_path():
    row = score_tree.plan([[[1, 2, 3, 0], [1, 4, 0], [5, 0]]]).rows[0]
    allowed = row.ancestry(len(row.tokens) + 1)
    for i in range(len(row.tokens)):
        want = set()
        node = i
        while node >= 0:
            want.add(node)
            node = row.parent[node]
        assert set(np.flatnonzero(allowed[i])) == want
    assert np.flatnonzero(allowed[-1]).tolist() == [len(row.tokens)]  # padding sees itself


def test_passes_respect_the_token_budget():
    rows = [score_tree.TreeRow(0, [1] * n, [0] * n, [-1] * n) for n in (5, 1, 3, 9, 2)]
    groups = score_tree.passes(rows, max_tokens=6)
    assert sorted(r for g in groups for r in g) == list(range(5))
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(rows[r].tokens) for r in g) <= 6
    assert groups[-1] == [3]  # longer than the budget: alone


def test_empty_sequence_is_refused():
    with pytest.raises(ValueError, match="empty"):
        score_tree.plan([[[]]])


def tiny_qwen2(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("nodes, tokens", [(256, 1024), (4, 9), (1, 1)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tree_scores_equal_a_full_forward(family, nodes, tokens, sp_tokenizer, qwen_tokenizer):
    """Scores by prefix trees (split into rows and passes of any size) equal a plain forward of
    prompt + sequence for left-padded prompts; titles sharing prefixes, a title's several paths,
    duplicates and one-token sequences included."""
    from gemel.backends import hf

    tok = sp_tokenizer if family == "llama" else qwen_tokenizer
    model = (tiny_llama if family == "llama" else tiny_qwen2)(len(tok))
    linker = make_linker(model, tok, TITLES, num_beams=3)
    ms = [mention(0, "Paris.", "Paris"), mention(1, TEXTS[2] + " " + TEXTS[0], "London"),
          mention(2, TEXTS[1], "Amazon")]
    embeds, mask = linker.model.embed([linker.builder.build(m) for m in ms])
    paths = [q for i in range(len(TITLES)) for q in linker.trie.paths(i)]
    seqs = [paths[p::2] + [paths[0], paths[0][:1]] for p in range(3)]
    stepper = hf.HFStepper(model, embeds, mask)
    assert stepper.shared
    got = stepper.score(seqs, nodes_per_row=nodes, tokens_per_pass=tokens)
    want = full_forward_scores(model, embeds, mask, seqs)
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)
