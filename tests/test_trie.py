"""EntityTrie: structure against a naive trie, persistence, sub-tries, tokenization boundaries."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemel.errors import DataError, MismatchError
from gemel.title_tokens import resolve_terminator, tokenize_titles, tokenizer_identity
from gemel.trie import EntityTrie
from gemel.trie_hash import tuple_hash

T = 0  # terminator in the token-level tests
SEQS = [[5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 7, 1], [2, 3]]  # [5, 6] is a prefix of [5, 6, 7]


def naive(seqs, term=T):
    """dict-of-dicts trie of seq + [term]; the leaf maps to the first index."""
    root, first = {}, {}
    for i, s in enumerate(seqs):
        node = root
        for t in list(s) + [term]:
            node = node.setdefault(t, {})
        first.setdefault(tuple(s), i)
    return root, first


def walk(root, prefix):
    node = root
    for t in prefix:
        if t not in node:
            return None
        node = node[t]
    return node


def all_prefixes(seqs, term=T):
    out = {()}
    for s in seqs:
        full = list(s) + [term]
        out.update(tuple(full[:k]) for k in range(len(full) + 1))
    return out


def check_against_naive(trie: EntityTrie, seqs, extra=()) -> None:
    root, first = naive(seqs)
    for p in sorted(all_prefixes(seqs) | set(extra)):
        node = walk(root, p)
        assert trie.allowed(list(p)).tolist() == (sorted(node) if node is not None else []), p
        got = trie.node_of(list(p))
        assert (got >= 0) == (node is not None), p
        if node is not None and p and p[-1] == T:
            assert trie.value(got) == first[p[:-1]]
        elif got >= 0:
            assert trie.value(got) == -1
    for i, s in enumerate(seqs):
        assert trie.sequence(i) == list(s) + [T]
    assert len(trie) == len(seqs)


@pytest.fixture(scope="module")
def trie():
    return EntityTrie.build(SEQS, T)


def test_round_trip_against_naive(trie):
    check_against_naive(trie, SEQS, extra=[(4,), (5, 4), (5, 6, 7, 1, 0, 3), (9, 9)])


def test_prefix_title_and_shared_prefixes(trie):
    assert trie.allowed([5]).tolist() == [6, 8]
    assert trie.allowed([5, 6]).tolist() == [T, 7]  # [5, 6] ends here or goes on
    assert trie.allowed([5, 6, 7]).tolist() == [T, 1]
    assert trie.value(trie.node_of([5, 6, T])) == 1
    assert trie.value(trie.node_of([5, 6, 7, T])) == 0
    assert trie.value(trie.node_of([5, 6])) == -1  # an inner node is no title


def test_root_unknown_and_walk(trie):
    assert trie.allowed([]).tolist() == [2, 5, 9]
    assert trie.node_of([]) == trie.root == 0
    for unknown in ([4], [5, 7], [9, 9], [5, 6, 7, 1, T, 3]):
        assert trie.allowed(unknown).size == 0 and trie.node_of(unknown) == -1
    assert trie.allowed([9, T]).size == 0  # a finished title allows nothing
    node = trie.root
    for t in [5, 6, 7, T]:
        tokens, nodes = trie.children(node)
        assert list(tokens) == sorted(tokens) and list(nodes) == list(range(nodes[0], nodes[-1] + 1))
        assert trie.step(node, t) == nodes[list(tokens).index(t)]
        node = trie.step(node, t)
    assert trie.value(node) == 0 and trie.children(node)[0].size == 0
    assert trie.step(trie.root, 4) == -1 and trie.step(-1, 5) == -1


def test_allowed_accepts_arrays_tuples_and_numpy_ints(trie):
    import torch

    want = [T, 7]
    assert trie.allowed(np.array([5, 6])).tolist() == want
    assert trie.allowed(torch.tensor([5, 6])).tolist() == want
    assert trie.allowed((5, 6)).tolist() == want
    assert trie.allowed([np.int64(5), np.int64(6)]).tolist() == want
    assert trie.allowed([5, 6]).dtype == np.int32


def test_index_hashes_are_cpython_tuple_hashes(trie):
    """Numpy computes every node's hash; a lookup hashes the prefix with hash(tuple)."""
    assert tuple_hash(()) == hash(()) and tuple_hash((5, 6, 7)) == hash((5, 6, 7))
    index = np.asarray(trie.prefix_index)
    spans = index.view(np.int32).reshape(-1, 4)
    assert np.all(np.diff(index[:, 0]) >= 0)  # rows sorted by hash (empty rows included)
    real = spans[:, 2] > 0  # empty rows have child range (0, 0)
    internal = int(np.sum(trie.edge_token[1:] != T))
    assert real.sum() == internal == len(set(trie.parent[spans[real, 2]].tolist()))
    for h, lo in zip(index[real, 0].tolist(), spans[real, 2].tolist()):
        node, path = int(trie.parent[lo]), []
        while node > 0:
            path.append(int(trie.edge_token[node]))
            node = int(trie.parent[node])
        assert h == tuple_hash(path[::-1])


def test_duplicates_keep_first_and_are_reported():
    seqs = [[1, 2], [3], [1, 2], [4], [3]]
    trie = EntityTrie.build(seqs, T)
    assert trie.duplicates.tolist() == [[2, 0], [4, 1]]
    assert trie.value(trie.node_of([1, 2, T])) == 0 and trie.value(trie.node_of([3, T])) == 1
    assert trie.sequence(2) == [1, 2, T]  # the duplicate still has its sequence
    check_against_naive(trie, seqs)


def test_terminator_inside_a_sequence_is_refused():
    with pytest.raises(DataError, match="sequence 1 contains the terminator"):
        EntityTrie.build([[1, 2], [3, T, 4]], T)


def test_empty_trie():
    trie = EntityTrie.build([], T)
    assert len(trie) == 0 and trie.allowed([]).size == 0 and trie.allowed([1]).size == 0


def test_save_load_round_trip_and_refusal(trie, tmp_path):
    trie.meta.update(kb_fingerprint="kb1", answer_prefix="[Answer]")
    trie.save(tmp_path / "t")
    loaded = EntityTrie.load(tmp_path / "t", expect={"kb_fingerprint": "kb1", "terminator": T})
    assert isinstance(loaded.prefix_index.base, np.memmap)  # memory-mapped, not read in
    check_against_naive(loaded, SEQS, extra=[(4,), (5, 4)])
    in_ram = EntityTrie.load(tmp_path / "t", mmap=False)
    assert not isinstance(in_ram.edge_token.base, np.memmap)
    assert in_ram.allowed([5, 6]).tolist() == [T, 7]
    with pytest.raises(MismatchError, match=r"kb_fingerprint='kb1'.*kb_fingerprint='kb2'"):
        EntityTrie.load(tmp_path / "t", expect={"kb_fingerprint": "kb2"})
    with pytest.raises(MismatchError, match="answer_prefix"):
        EntityTrie.load(tmp_path / "t", expect={"answer_prefix": "Answer:"})
    with pytest.raises(DataError, match="trie.json"):
        EntityTrie.load(tmp_path / "nowhere")
    # saving again over the folder replaces it (also while a loaded copy maps the old files)
    EntityTrie.build([[7]], T, meta={"kb_fingerprint": "kb3"}).save(tmp_path / "t")
    assert loaded.allowed([5, 6]).tolist() == [T, 7]
    again = EntityTrie.load(tmp_path / "t", expect={"kb_fingerprint": "kb3"})
    assert again.allowed([]).tolist() == [7]


def test_subtrie_equivalence():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 30, rng.integers(1, 7)).tolist() for _ in range(300)]
    full = EntityTrie.build(seqs, T)
    for trial in range(20):
        size = int(rng.integers(1, 40))
        chosen = sorted(rng.choice(len(seqs), size=size, replace=False).tolist())
        sub = full.subtrie(chosen)
        assert len(sub) == len(chosen)
        for i in chosen:  # every chosen title is present and maps to a chosen title
            seq = full.sequence(i)
            assert sub.sequence(i) == seq and sub.value(sub.node_of(seq)) in chosen
        finished = []  # every sequence of the sub-trie is in the full trie and is a chosen title
        stack = [(sub.root, [])]
        while stack:
            node, path = stack.pop()
            if sub.value(node) >= 0:
                finished.append(path)
                assert full.value(full.node_of(path)) >= 0
                assert seqs[sub.value(node)] + [T] == path and sub.value(node) in chosen
            for t, child in zip(*sub.children(node)):
                assert full.step(full.node_of(path), int(t)) >= 0
                stack.append((int(child), path + [int(t)]))
            assert sub.allowed(path).tolist() == sub.children(node)[0].tolist()
        assert len(finished) == len({tuple(seqs[i]) for i in chosen})
        nested = sub.subtrie(chosen[: len(chosen) // 2 + 1])  # a sub-trie of a sub-trie
        assert sorted(nested.leaf_value.tolist()) == sorted(
            {min(j for j in chosen[: len(chosen) // 2 + 1] if seqs[j] == seqs[i])
             for i in chosen[: len(chosen) // 2 + 1]})
    with pytest.raises(KeyError):
        full.subtrie([len(seqs)])
    with pytest.raises(KeyError):
        full.subtrie([0]).sequence(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 6), max_size=6), max_size=25),
       st.lists(st.lists(st.integers(0, 7), max_size=5), max_size=10))
def test_property_against_dict_trie(seqs, probes):
    check_against_naive(EntityTrie.build(seqs, T), seqs, extra=[tuple(p) for p in probes])


# -- several paths per title (an end merged with the terminator) ------------------------------
M = (100, 101, 102)  # "merged" end tokens: each holds a title's last characters and the terminator


def with_merged(seqs, natural):
    """Each title's paths, natural first: ``natural[i]`` where given, and ``seq + [T]``."""
    return [([list(natural[i])] if i in natural and list(natural[i]) != list(s) + [T] else [])
            + [list(s) + [T]] for i, s in enumerate(seqs)]


def check_paths(trie: EntityTrie, paths, extra=()) -> None:
    """The trie against a dict trie of every path; a leaf holds the first title ending there."""
    root, first = {}, {}
    for i, ps in enumerate(paths):
        for q in ps:
            node = root
            for t in q:
                node = node.setdefault(t, {})
            first.setdefault(tuple(q), i)
    prefixes = {()} | {tuple(q[:k]) for ps in paths for q in ps for k in range(len(q) + 1)}
    for p in sorted(prefixes | set(extra)):
        node = walk(root, p)
        assert trie.allowed(list(p)).tolist() == (sorted(node) if node is not None else []), p
        got = trie.node_of(list(p))
        assert (got >= 0) == (node is not None), p
        assert trie.value(got) == (first[p] if p in first else -1) if got >= 0 else True, p
    for i, ps in enumerate(paths):
        assert trie.paths(i) == ps and trie.sequence(i) == ps[0]
        assert all(trie.value(trie.node_of(q)) == first[tuple(q)] for q in ps)


@st.composite
def merged_titles(draw):
    seqs = draw(st.lists(st.lists(st.integers(1, 6), max_size=6), max_size=20))
    natural = {}
    for i in draw(st.sets(st.integers(0, max(len(seqs) - 1, 0)), max_size=len(seqs))):
        if i < len(seqs):  # the title's last 0..2 tokens and the terminator merged into one
            cut = max(len(seqs[i]) - draw(st.integers(0, 2)), 0)
            natural[i] = seqs[i][:cut] + [draw(st.sampled_from(M))]
    return seqs, natural


@settings(max_examples=60, deadline=None)
@given(merged_titles(), st.lists(st.lists(st.sampled_from([0, 1, 5, 6, 100, 101]), max_size=5),
                                 max_size=10))
def test_property_several_paths_per_title(titles, probes):
    seqs, natural = titles
    trie = EntityTrie.build(seqs, T, natural=natural)
    paths = with_merged(seqs, natural)
    check_paths(trie, paths, extra=[tuple(p) for p in probes])
    chosen = sorted(set(range(0, len(seqs), 2)))
    if chosen:  # a sub-trie keeps every path of its titles, and nothing else
        sub = trie.subtrie(chosen)
        for i in chosen:
            assert sub.paths(i) == paths[i] and {sub.value(sub.node_of(q)) for q in paths[i]} \
                <= set(chosen)
        ends, stack = [], [(sub.root, [])]
        while stack:
            node, path = stack.pop()
            if sub.value(node) >= 0:
                ends.append(tuple(path))
            stack.extend((int(k), path + [int(t)]) for t, k in zip(*sub.children(node)))
        assert sorted(ends) == sorted({tuple(q) for i in chosen for q in paths[i]})


def test_merged_paths_structure_save_and_load(tmp_path):
    seqs = [[5, 6, 7], [5, 6], [9], [5, 6, 7]]  # title 3 repeats title 0
    natural = {0: [5, 6, 100], 1: [5, 101], 3: [5, 6, 100]}
    trie = EntityTrie.build(seqs, T, natural=natural)
    assert trie.allowed([5, 6]).tolist() == [T, 7, 100]  # end here (two ways) or go on
    assert trie.allowed([5]).tolist() == [6, 101]
    assert trie.value(trie.node_of([5, 6, 100])) == trie.value(trie.node_of([5, 6, 7, T])) == 0
    assert trie.value(trie.node_of([5, 101])) == trie.value(trie.node_of([5, 6, T])) == 1
    assert trie.allowed([5, 6, 100]).size == 0 and trie.node_of([5, 6, 100, T]) == -1
    assert trie.node_of([5, 102]) == -1 and trie.node_of([7, 100]) == -1
    assert trie.leaf_mask(trie.children(trie.node_of([5, 6]))[1]).tolist() == [True, False, True]
    assert trie.duplicates.tolist() == [[3, 0]]
    assert trie.paths(3) == trie.paths(0) == [[5, 6, 100], [5, 6, 7, T]]
    trie.save(tmp_path / "t")
    loaded = EntityTrie.load(tmp_path / "t")
    check_paths(loaded, with_merged(seqs, natural))
    info = json.loads((tmp_path / "t" / "trie.json").read_text())
    info["version"] = 2  # a trie saved before titles had several paths
    (tmp_path / "t" / "trie.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"version 2.*one token path per title.*gemel build-trie"):
        EntityTrie.load(tmp_path / "t")


def test_a_path_ending_inside_another_is_refused():
    with pytest.raises(DataError, match="title 1.*ends where another title's path goes on"):
        EntityTrie.build([[5, 6, 7], [5]], T, natural={1: [5, 6]})
    with pytest.raises(DataError, match="terminator 0 before its end"):
        EntityTrie.build([[5], [6]], T, natural={1: [6, T, 7]})


# -- tokenization ------------------------------------------------------------------------------
def _byte_bpe(corpus, vocab_size, use_regex=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_from_titles_matches_in_context_tokens_and_newline_terminator(bpe_tokenizer):
    tok = bpe_tokenizer
    titles = ["Paris", "Paris Hilton", "Paris, Texas", "Michael Jordan", "Amazon River"]
    trie = EntityTrie.from_titles(titles, tok, "[Answer]", "\n", kb_fingerprint="kb")
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    assert trie.terminator == newline != tok.eos_token_id and tok.decode([newline]) == "\n"
    prefix = tok("[Answer]", add_special_tokens=False)["input_ids"]
    for i, title in enumerate(titles):  # exactly what follows the prefix in a demonstration
        demo = tok("[Answer]" + title + "\n", add_special_tokens=False)["input_ids"]
        assert demo[:len(prefix)] == prefix and trie.sequence(i) == demo[len(prefix):]
    assert trie.boundary_merged == [] and trie.terminator_merged == []
    assert trie.meta["tokenizer"] == tokenizer_identity(tok)
    assert trie.meta["answer_prefix"] == "[Answer]" and trie.meta["kb_fingerprint"] == "kb"
    eos = EntityTrie.from_titles(titles, tok, "[Answer]", tok.eos_token_id)  # an id works too
    assert eos.terminator == tok.eos_token_id and eos.sequence(0)[:-1] == trie.sequence(0)[:-1]


def test_boundary_merge_with_the_answer_prefix_is_reported():
    corpus = ["[Answer](band)\n", "[Answer]Queen (band)\n", "[Answer]Paris\n",
              "The (band) played.\n"] * 20
    tok = _byte_bpe(corpus, 300)
    prefix = tok("[Answer]", add_special_tokens=False)["input_ids"]
    merged = tok("[Answer](band)", add_special_tokens=False)["input_ids"]
    assert merged[:len(prefix)] != prefix  # "](" is one token: the merge crosses the boundary
    titles = ["Paris", "(band)", "Queen (band)"]
    trie = EntityTrie.from_titles(titles, tok, "[Answer]")
    assert trie.boundary_merged == ["(band)"]
    alone = tok("(band)\n", add_special_tokens=False)["input_ids"]
    assert trie.sequence(1) == alone and trie.value(trie.node_of(alone)) == 1
    assert trie.sequence(0)[:-1] == tok("Paris", add_special_tokens=False)["input_ids"]


def test_terminator_merge_is_reported_and_ends_either_way():
    tok = _byte_bpe([c + ".\n" for c in string.ascii_letters] * 5, 261, use_regex=False)
    assert len(tok("Inc.\n", add_special_tokens=False)["input_ids"]) == 4  # ".\n" is one token
    trie = EntityTrie.from_titles(["Apple Inc.", "Rome"], tok, "[Answer]", "\n")
    assert trie.terminator_merged == ["Apple Inc."] and trie.boundary_merged == []
    lp = len(tok("[Answer]", add_special_tokens=False)["input_ids"])
    title = tok("[Answer]Apple Inc.", add_special_tokens=False)["input_ids"][lp:]
    demo = tok("[Answer]Apple Inc.\n", add_special_tokens=False)["input_ids"][lp:]
    assert trie.sequence(0) == demo != title + [trie.terminator]  # natural: ".\n" merged
    assert trie.paths(0) == [demo, title + [trie.terminator]]
    assert trie.paths(1) == [trie.sequence(1)] and trie.sequence(1)[-1] == trie.terminator


def test_sentencepiece_style_newline_is_a_byte_token():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    sp.train_from_iterator(["Paris", "Paris Hilton", "London", "Answer"] * 10,
                           trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    term, tail = resolve_terminator(tok, "[Answer]", "\n")
    assert term == tok.convert_tokens_to_ids("<0x0A>") and tail == [term]
    trie = EntityTrie.from_titles(["Paris", "London"], tok, "[Answer]")
    assert trie.terminator == term and all(trie.sequence(i)[-1] == term for i in range(2))


def test_bad_terminators_and_titles(bpe_tokenizer):
    with pytest.raises(DataError, match="terminator"):
        resolve_terminator(bpe_tokenizer, "[Answer]", "")
    with pytest.raises(DataError, match="outside the vocabulary"):
        resolve_terminator(bpe_tokenizer, "[Answer]", 10 ** 6)
    with pytest.raises(DataError, match="title 'Two\\\\nlines' contains the terminator"):
        EntityTrie.from_titles(["Paris", "Two\nlines"], bpe_tokenizer, "[Answer]")


def test_tokenize_titles_batches_agree(bpe_tokenizer):
    titles = ["Paris", "Jordan River", "", "Tower Bridge", "London"] * 3
    one = tokenize_titles(titles, bpe_tokenizer, "[Answer]", batch_size=4)
    all_at_once = tokenize_titles(titles, bpe_tokenizer, "[Answer]")
    assert np.array_equal(one.tokens, all_at_once.tokens)
    assert np.array_equal(one.offsets, all_at_once.offsets) and len(one.offsets) == len(titles) + 1
    assert one.offsets[3] == one.offsets[2]  # the empty title has no tokens before its terminator


def test_tokenizer_identity_tells_vocabularies_apart(bpe_tokenizer, sp_tokenizer):
    a, b = tokenizer_identity(bpe_tokenizer), tokenizer_identity(sp_tokenizer)
    assert a == tokenizer_identity(bpe_tokenizer)
    assert a["vocab_sha256"] != b["vocab_sha256"] and a["vocab_size"] == len(bpe_tokenizer)


def test_chunked_and_argsort_paths_agree(monkeypatch):
    """Small chunks (the memory-saving loops) and the argsort path (keys wider than 64 bits)
    build the same trie as the default path."""
    import gemel.trie_hash as hash_module
    import gemel.trie_levels as levels_module

    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 50, rng.integers(0, 6)).tolist() for _ in range(400)]
    plain = EntityTrie.build(seqs, T)
    monkeypatch.setattr(hash_module, "_CHUNK", 7)
    monkeypatch.setattr(levels_module, "_KEY_BITS", 8)
    monkeypatch.setattr(hash_module, "_SPARE", 0)  # the table must grow for the last cluster
    other = EntityTrie.build(seqs, T)
    for name in ("edge_token", "child_start", "parent", "prefix_index", "leaf_node",
                 "leaf_value", "title_leaf", "duplicates"):
        assert np.array_equal(getattr(plain, name), getattr(other, name)), name
    check_against_naive(other, seqs, extra=[(49,), (1, 1, 1)])


def test_shared_hash_entries_fall_back_to_walking():
    """Two nodes with one 64-bit hash (never seen, but possible) are marked child range
    (-1, -1); lookups of such a prefix walk from the root and still answer exactly."""
    seqs = [[5, 6, 7], [5, 8], [9, 6]]
    trie = EntityTrie.build(seqs, T)
    spans = trie.prefix_index.view(np.int32).reshape(-1, 4)
    row = int(np.flatnonzero(trie.prefix_index[:-1, 0] == hash((5, 6)))[0])
    spans[row, 2:] = -1  # as _finish_index marks a shared hash
    assert trie.allowed([5, 6]).tolist() == [7] and trie.node_of([5, 6, 7, T]) >= 0
    assert trie.value(trie.node_of([5, 6, 7, T])) == 0
    check_against_naive(trie, seqs)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_tokenizer_families_end_titles_as_they_tokenize(family, qwen_tokenizer, gemma_tokenizer,
                                                        tmp_path):
    """Qwen-style byte-level BPE (")\\n" one token) and Gemma-style SentencePiece with byte
    fallback: a title's natural path is its tokens in a demonstration, up to the token that holds
    the newline; a title merged with the newline also ends as its own tokens + the newline; both
    paths reach the same title, in the trie, a sub-trie and a reloaded trie."""
    from tests.conftest import MERGE_TITLES

    tok = qwen_tokenizer if family == "qwen" else gemma_tokenizer
    trie = EntityTrie.from_titles(MERGE_TITLES, tok, "[Answer]", "\n")
    term = trie.terminator
    assert tok.decode([term]) == "\n" and trie.boundary_merged == []
    lp = len(tok("[Answer]", add_special_tokens=False)["input_ids"])
    merged = []
    for i, title in enumerate(MERGE_TITLES):
        demo = tok("[Answer]" + title + "\n", add_special_tokens=False)["input_ids"][lp:]
        own = tok("[Answer]" + title, add_special_tokens=False)["input_ids"][lp:]
        assert trie.sequence(i) == demo  # what the model reads in its demonstrations
        assert tok.decode(demo) == title + "\n"
        if demo[-1] != term:  # the newline merged with the title's end: ")\n", "Trek\n"
            merged.append(title)
            assert trie.paths(i) == [demo, own + [term]]
            assert "\n" in tok.decode(demo[-1:]) and tok.decode(demo[-1:]) != "\n"
        else:
            assert trie.paths(i) == [demo]
        for q in trie.paths(i):
            assert trie.value(trie.node_of(q)) == i and trie.allowed(q).size == 0
    assert merged == trie.terminator_merged and "Star Trek (film)" in merged
    if family == "gemma":  # byte fallback: "Zürich" is bytes, "ü" two of them
        zurich = trie.sequence(MERGE_TITLES.index("Zürich"))
        assert tok.convert_ids_to_tokens(zurich)[:3] == ["<0x5A>", "<0xC3>", "<0xBC>"]
    sub = trie.subtrie([0, 3, 7])
    trie.save(tmp_path / "t")
    loaded = EntityTrie.load(tmp_path / "t")
    for i in range(len(MERGE_TITLES)):
        assert loaded.paths(i) == trie.paths(i)
        if i in (0, 3, 7):
            assert sub.paths(i) == trie.paths(i)
            assert all(sub.value(sub.node_of(q)) == i for q in trie.paths(i))
