"""Demonstration retrieval: exclusion rule, determinism, caching, lexical/dense sanity, fusion."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gemel.errors import DataError, GemelError, MissingDependency
from gemel.retrieval import (DenseIndex, Demonstration, ExclusionIndex, Retriever,
                             ScoredRetriever, SentenceEncoder, field_text, get_retriever,
                             order_demonstrations, retriever_names)
from gemel.retrieval.hybrid import minmax_rows
from gemel.retrieval.topk import top_k
from gemel.types import Mention

ROWS = [  # (mention, sentence, entity)
    ("Obama", "Barack Obama visited Paris on Monday.", "Barack Obama"),
    ("Paris", "Barack Obama visited Paris on Monday.", "Paris"),
    ("UK", "The UK parliament voted on the budget.", "United Kingdom"),
    ("parliament", "The UK parliament voted on the budget.", "Parliament of the United Kingdom"),
    ("Jordan", "Michael Jordan scored 40 points for the Bulls.", "Michael Jordan"),
    ("Bulls", "Michael Jordan scored 40 points for the Bulls.", "Chicago Bulls"),
    ("Jordan", "The Jordan River flows into the Dead Sea.", "Jordan River"),
    ("Amazon", "Amazon reported record quarterly profits.", "Amazon (company)"),
    ("Amazon", "The Amazon rainforest is shrinking.", "Amazon rainforest"),
    ("Mercury", "Freddie Mercury sang with Queen at Wembley.", "Freddie Mercury"),
    ("Queen", "Freddie Mercury sang with Queen at Wembley.", "Queen (band)"),
    ("Tower Bridge", "Tourists crossed Tower Bridge over the Thames in London.", "Tower Bridge"),
    ("London", "Tourists crossed Tower Bridge over the Thames in London.", "London"),
    ("Apple", "Apple unveiled a new iPhone in California.", "Apple Inc."),
    ("Elizabeth II", "Queen Elizabeth II opened the new session.", "Elizabeth II"),
    ("United Kingdom", "Trade between the United Kingdom and France grew.", "United Kingdom"),
    ("France", "Trade between the United Kingdom and France grew.", "France"),
    ("Obama", "Barack Obama visited Paris on Monday.", "Barack Obama"),  # m17 duplicates m0
    ("Michelle Obama", "Michelle Obama spoke at the convention.", "Michelle Obama"),
    ("Mercury", "Mercury is the closest planet to the Sun.", "Mercury (planet)"),
]
TRAIN = [Mention(id=f"m{i}", text=s, mention=m, entity=e, entity_id=f"E{i}")
         for i, (m, s, e) in enumerate(ROWS)]
NEW = [Mention(id="q0", text="A boat sailed under Tower Bridge on the Thames.", mention="Tower Bridge"),
       Mention(id="q1", text="Britain joined the talks.", mention="Britain"),
       Mention(id="q2", text="The singer Freddie Mercury died in 1991.", mention="Freddie Mercury"),
       Mention(id="q3", text="", mention="")]


@pytest.fixture(scope="session")
def minilm():
    """The real offline MiniLM sentence model, loaded once."""
    try:
        encoder = SentenceEncoder("minilm-l6-v2")
    except MissingDependency as err:
        pytest.skip(f"offline sentence model absent: {err}")
    encoder.embed(["warm up"])
    return encoder


@pytest.fixture()
def make(minilm, tmp_path):
    """name -> fitted retriever (simcse shares the session's MiniLM)."""
    def build(name: str, **options):
        if name == "simcse":
            options.setdefault("encoder", minilm)
            options.setdefault("cache_dir", tmp_path / "index")
        if name == "hybrid":
            options.setdefault("retrievers", {"simcse": get_retriever(
                "simcse", encoder=minilm, cache_dir=tmp_path / "index")})
        return get_retriever(name, **options).fit(TRAIN)
    return build


NAMES = ["simcse", "bm25", "random", "hybrid"]


def ids(demos):
    return [d.mention.id for d in demos]


# -- the exclusion rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_never_itself_nor_same_mention_and_sentence(make, name):
    retriever = make(name)
    assert isinstance(retriever, Retriever) and retriever.name == name
    for q in TRAIN:
        got = retriever.query(q, k=len(TRAIN))
        key = (q.mention, q.text)
        assert q.id not in ids(got)
        assert all((d.mention.mention, d.mention.text) != key for d in got)
        # everything else comes back: the rule removes exactly the query and its duplicates
        expected = {m.id for m in TRAIN if m.id != q.id and (m.mention, m.text) != key}
        assert set(ids(got)) == expected
        sims = [d.similarity for d in got]
        assert sims == sorted(sims, reverse=True)
    # m0 and m17 are the same (mention, sentence): neither is the other's demonstration
    assert "m17" not in ids(retriever.query(TRAIN[0], k=19))


def test_same_id_excluded_even_with_other_text(make):
    retriever = make("bm25", field="mention+sentence")
    q = Mention(id="m11", text="A boat sailed under Tower Bridge on the Thames.", mention="Thames")
    got = ids(retriever.query(q, k=5))
    assert "m11" not in got and got[0] == "m12"  # m12 shares Tower Bridge / Thames


def test_extra_exclude_predicate(make):
    retriever = make("simcse")
    q = NEW[2]  # Freddie Mercury
    plain = retriever.query(q, k=3)
    assert plain[0].mention.entity == "Freddie Mercury"
    got = retriever.query(q, k=3, exclude=lambda m: m.entity == "Freddie Mercury")
    assert len(got) == 3 and all(d.mention.entity != "Freddie Mercury" for d in got)
    # the predicate can remove all but a few: what is left comes back, no more
    few = retriever.query(q, k=10, exclude=lambda m: m.mention != "Mercury")
    assert ids(few) == ["m9", "m19"] or ids(few) == ["m19", "m9"]


# -- batch == single ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_query_batch_equals_query(make, name):
    retriever = make(name)
    queries = TRAIN + NEW
    batch = retriever.query_batch(queries, k=6)
    for q, got in zip(queries, batch):
        single = retriever.query(q, k=6)
        assert ids(got) == ids(single)
        np.testing.assert_allclose([d.similarity for d in got],
                                   [d.similarity for d in single], rtol=0, atol=1e-5)


# -- random --------------------------------------------------------------------------------------------
def test_random_is_seeded_per_query(make):
    a, b, c = make("random", seed=1), make("random", seed=1), make("random", seed=2)
    for q in TRAIN[:5]:
        assert ids(a.query(q, k=5)) == ids(b.query(q, k=5))
    assert [ids(a.query(q, k=5)) for q in TRAIN] != [ids(c.query(q, k=5)) for q in TRAIN]
    draws = {tuple(ids(a.query(q, k=5))) for q in TRAIN}
    assert len(draws) >= len(TRAIN) - 2  # different queries, different demonstrations
    # independent of batch composition and order
    rev = a.query_batch(TRAIN[::-1], k=5)[::-1]
    assert [ids(r) for r in rev] == [ids(a.query(q, k=5)) for q in TRAIN]


# -- bm25 ----------------------------------------------------------------------------------------------
def test_bm25_finds_the_lexical_neighbour(make):
    retriever = make("bm25", field="mention+sentence")
    got = retriever.query(NEW[0], k=3)  # "Tower Bridge ... Thames"
    assert ids(got)[:2] == ["m11", "m12"] and got[0].similarity > got[1].similarity > 0
    only_mention = make("bm25")  # field="mention"
    assert ids(only_mention.query(NEW[0], k=1)) == ["m11"]
    # "Freddie Mercury": both "Mercury" mentions tie exactly; the earlier record comes first
    tied = only_mention.query(NEW[2], k=3)
    assert ids(tied)[:2] == ["m9", "m19"] and tied[0].similarity == tied[1].similarity > 0
    # an all-stop-word / empty query scores 0 everywhere: ties resolved by training order
    empty = retriever.query(NEW[3], k=3)
    assert ids(empty) == ["m0", "m1", "m2"] and {d.similarity for d in empty} == {0.0}


# -- simcse and the dense index ---------------------------------------------------------------------
def test_simcse_semantic_neighbour(make):
    retriever = make("simcse", field="mention")
    assert retriever.query(NEW[1], k=1)[0].mention.entity == "United Kingdom"  # Britain
    sims = [d.similarity for d in retriever.query(NEW[1], k=19)]
    assert -1.0 <= min(sims) <= max(sims) <= 1.0
    # identical mention strings share one vector: a "Jordan" query ties them, lower row first
    got = retriever.query(Mention(id="x", text="Jordan won.", mention="Jordan"), k=2)
    assert ids(got) == ["m4", "m6"] and got[0].similarity == got[1].similarity
    assert retriever.embed(["a", "b"]).shape == (2, 384)


def test_simcse_cache_reused_then_rebuilt(minilm, tmp_path):
    cache = tmp_path / "cache"
    calls = minilm.calls
    first = get_retriever("simcse", cache_dir=cache, encoder=minilm).fit(TRAIN)
    assert not first.index.loaded_from_cache and minilm.calls > calls
    npy = first.index.cache_path
    mtime = npy.stat().st_mtime_ns
    meta = json.loads(npy.with_suffix(".json").read_text())["fingerprint"]
    assert meta["extra"] == {"field": "mention"} and meta["n_texts"] == len(TRAIN)
    assert meta["n_unique"] == len({m.mention for m in TRAIN})  # duplicates embedded once

    # a fresh retriever with its own (not yet loaded) encoder finds the entry
    again = get_retriever("simcse", cache_dir=cache).fit(TRAIN)
    assert again.index.loaded_from_cache
    assert again.encoder.calls == 0 and again.encoder._st is None  # model never even loaded
    assert npy.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.index.vectors, first.index.vectors)
    assert ids(again.query(TRAIN[0], k=5)) == ids(first.query(TRAIN[0], k=5))

    def fit(train, **options):
        before = minilm.calls
        index = get_retriever("simcse", cache_dir=cache, encoder=minilm, **options).fit(train).index
        return index, minilm.calls > before

    changed = TRAIN[:-1] + [Mention(id="m19", text="Mercury rises.", mention="Hermes")]
    rebuilt, embedded = fit(changed)
    assert not rebuilt.loaded_from_cache and embedded and rebuilt.cache_path != npy
    renamed = [Mention(id=f"r{i}", text=m.text, mention=m.mention) for i, m in enumerate(TRAIN)]
    assert fit(renamed)[1]  # ids are part of the fingerprint
    assert fit(TRAIN, field="mention+sentence")[1]
    assert not fit(TRAIN)[1] and npy.stat().st_mtime_ns == mtime  # still the first entry

    # a damaged entry is rebuilt, not trusted
    npy.with_suffix(".json").write_text("{not json")
    damaged, embedded = fit(TRAIN)
    assert embedded and not damaged.loaded_from_cache


def test_dense_index_over_arbitrary_texts(minilm, tmp_path):
    kb = ["Paris. Capital of France.", "Paris Hilton. American media personality.",
          "Jordan River. River in the Middle East.", "Michael Jordan. American basketball player.",
          "Amazon River. River in South America."]
    index = DenseIndex.build(kb, minilm, ids=[f"Q{i}" for i in range(5)], cache_dir=tmp_path)
    scores, rows = index.search_texts(["the basketball player", "the river in Brazil"], k=2)
    assert scores.shape == rows.shape == (2, 2)
    assert rows[0, 0] == 3 and rows[1, 0] == 4
    assert np.all(scores[:, 0] >= scores[:, 1])
    banned_scores, banned_rows = index.search(minilm.embed(["the basketball player"]), k=5,
                                              banned=[np.array([3])])
    assert 3 not in banned_rows[0, :4] and banned_scores[0, -1] == -np.inf
    calls = minilm.calls
    v = index.vectors_for(["zebra crossing", kb[0], "zebra crossing"])
    assert minilm.calls == calls + 1  # one batch, the unseen text embedded once
    np.testing.assert_array_equal(v[0], v[2])
    np.testing.assert_array_equal(v[1], index.vectors[0])  # indexed text: its stored vector
    # vectors straight from an array (e.g. cached image features), no encoder
    plain = DenseIndex(np.eye(3) * 2.0)
    np.testing.assert_allclose(np.linalg.norm(plain.vectors, axis=1), 1.0)
    with pytest.raises(DataError, match="no encoder"):
        plain.vectors_for(["unknown"])


def test_encoder_mean_pooling_matches_sentence_transformers(minilm):
    """Our own pooling path (used for SimCSE checkpoints) reproduces MiniLM's mean pooling."""
    ours = SentenceEncoder("minilm-l6-v2", pooling="mean", max_length=256)
    texts = ["Barack Obama visited Paris.", "UK", "a much longer sentence about the river " * 3]
    np.testing.assert_allclose(ours.embed(texts), minilm.embed(texts), atol=1e-5)
    cls = SentenceEncoder("minilm-l6-v2", pooling="pooler").embed(texts)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-6)
    assert SentenceEncoder("minilm-l6-v2").identity()["pooling"] == "auto"
    from gemel.retrieval.encoder import default_pooling
    assert default_pooling("princeton-nlp/sup-simcse-roberta-large") == "pooler"
    assert default_pooling("princeton-nlp/unsup-simcse-bert-base-uncased") == "cls"


# -- hybrid ----------------------------------------------------------------------------------------------
def test_hybrid_weights(make, minilm, tmp_path):
    simcse = get_retriever("simcse", encoder=minilm, cache_dir=tmp_path / "i")
    bm25 = get_retriever("bm25")
    pure_bm25 = make("hybrid", weights={"bm25": 1.0, "simcse": 0.0},
                     retrievers={"simcse": simcse, "bm25": bm25})
    for q in NEW[:3]:
        assert ids(pure_bm25.query(q, k=4)) == ids(bm25.query(q, k=4))
    pure_simcse = make("hybrid", weights={"bm25": 0.0, "simcse": 2.0},
                       retrievers={"simcse": simcse, "bm25": bm25})
    for q in NEW[:3]:
        assert ids(pure_simcse.query(q, k=4)) == ids(simcse.query(q, k=4))

    mix = make("hybrid", weights={"simcse": 3, "bm25": 1},
               retrievers={"simcse": simcse, "bm25": bm25})
    q = TRAIN[11]  # Tower Bridge: its own row would be simcse's max if it were not banned
    banned = ExclusionIndex(TRAIN).banned(q)
    parts = []
    for component in (simcse, bm25):
        raw = component._scores([q]).astype(np.float32)
        raw[0, banned] = -np.inf
        parts.append(minmax_rows(raw)[0])
    expected = 0.75 * parts[0] + 0.25 * parts[1]
    got = mix.query(q, k=5)
    for d in got:
        assert d.similarity == pytest.approx(float(expected[int(d.mention.id[1:])]), abs=1e-6)
    assert got[0].similarity <= 1.0 and ids(got)[0] == "m12"

    with pytest.raises(DataError, match="positive weight"):
        get_retriever("hybrid", weights={"bm25": 0.0})
    with pytest.raises(DataError, match=">= 0"):
        get_retriever("hybrid", weights={"bm25": -1.0, "random": 1.0})
    with pytest.raises(DataError, match="unknown retriever"):
        get_retriever("hybrid", weights={"nope": 1.0})


def test_minmax_rows():
    s = np.array([[1.0, 3.0, -np.inf, 2.0], [5.0, 5.0, 5.0, -np.inf]], dtype=np.float32)
    out = minmax_rows(s)
    np.testing.assert_allclose(out[0], [0.0, 1.0, -np.inf, 0.5])
    np.testing.assert_allclose(out[1], [1.0, 1.0, 1.0, -np.inf])


# -- ordering, top-k, registry -------------------------------------------------------------------------
def test_order_demonstrations():
    d = [Demonstration(TRAIN[i], s) for i, s in enumerate([0.9, 0.5, 0.5, 0.1])]
    asc = order_demonstrations(d)
    assert [x.similarity for x in asc] == [0.1, 0.5, 0.5, 0.9]
    shuffled = [d[2], d[0], d[3], d[1]]
    assert [x.similarity for x in order_demonstrations(shuffled)] == [0.1, 0.5, 0.5, 0.9]
    desc = order_demonstrations(d, "descending")
    assert desc == d and asc == desc[::-1]  # ascending mirrors descending, ties included
    assert order_demonstrations([]) == []
    with pytest.raises(DataError, match="ascending"):
        order_demonstrations(d, "random")


def test_top_k_is_exact_and_breaks_ties_by_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties
    scores[3, :] = 1.0
    scores[5, 10:] = -np.inf
    values, rows = top_k(scores, 12)
    for r in range(len(scores)):
        reference = sorted(range(40), key=lambda i: (-scores[r, i], i))[:12]
        assert rows[r].tolist() == reference
        np.testing.assert_array_equal(values[r], scores[r, reference])
    assert top_k(scores, 100)[1].shape == (50, 40)
    assert top_k(scores, 0)[1].shape == (50, 0)


def test_registry_and_errors(make):
    assert {"simcse", "bm25", "random", "hybrid", "image"} <= set(retriever_names())
    with pytest.raises(DataError, match="unknown retriever 'nope'"):
        get_retriever("nope")
    with pytest.raises(DataError, match="unknown option"):
        get_retriever("bm25", feild="mention")
    with pytest.raises(DataError, match="unknown field"):
        get_retriever("bm25", field="title")
    with pytest.raises(GemelError, match="not fitted"):
        get_retriever("random").query(TRAIN[0], k=2)
    with pytest.raises(DataError, match="no training mentions"):
        get_retriever("random").fit([])
    retriever = make("random")
    with pytest.raises(DataError, match="k must be"):
        retriever.query(TRAIN[0], k=-1)
    assert retriever.query(TRAIN[0], k=0) == []
    assert isinstance(retriever, ScoredRetriever)


def test_field_text():
    m = TRAIN[2]
    assert field_text(m, "mention") == "UK"
    assert field_text(m, "sentence") == m.text
    assert field_text(m, "mention+sentence") == f"UK. {m.text}"
    visual_only = Mention(id="v", text="A red box marks him.", mention=None)
    assert field_text(visual_only, "mention") == "A red box marks him."
