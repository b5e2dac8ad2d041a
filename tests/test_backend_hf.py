"""Trie-constrained beam search on tiny random LLaMA- and OPT-style models."""
from __future__ import annotations

import random

import pytest
import torch

from gemel.backends.hf import HFBackend
from gemel.beam import score_titles
from gemel.kb import KnowledgeBase
from gemel.linker import Linker, LinkerConfig
from gemel.model import GemelModel
from gemel.prompting import PromptBuilder
from gemel.types import Entity, Mention
from tests.conftest import TITLES, needs_cuda, tiny_llama, tiny_opt

TEXTS = ["Obama visited Paris with Michelle.", "The Amazon River floods every year.",
         "Queen played at Tower Bridge in London.", "Jordan scored 40 points for the Bulls."]


def make_linker(model, tokenizer, titles, num_beams=5, device="cpu", **cfg) -> Linker:
    kb = KnowledgeBase.from_entities(Entity(f"Q{i}", t) for i, t in enumerate(titles))
    config = LinkerConfig(model="tiny", num_beams=num_beams, top_k=num_beams, **cfg)
    return Linker(config, kb, HFBackend(model.to(device), tokenizer, device))


def mention(i: int, text: str, word: str) -> Mention:
    return Mention(id=str(i), text=text, mention=word)


def exhaustive_scores(linker: Linker, m: Mention) -> list[float]:
    """Teacher-forced log-probability of every title after the prompt: the best over all its
    token paths (title tokens + terminator, or ending in a token merged with the terminator)."""
    embeds, mask = linker.model.embed([linker.builder.build(m)])
    paths = [linker.trie.paths(i) for i in range(len(linker.kb.titles))]
    flat = linker.backend.score(embeds, mask, [[p for ps in paths for p in ps]])[0]
    out, at = [], 0
    for ps in paths:
        out.append(max(flat[at:at + len(ps)]))
        at += len(ps)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_exhaustive_beam_equals_argmax(family, device, sp_tokenizer, bpe_tokenizer):
    """With beams >= titles the search is exact: top-1 is the argmax of the sequence log-prob,
    and each returned score equals the teacher-forced score of its title."""
    rng = random.Random(0)
    tokenizer = sp_tokenizer if family == "llama" else bpe_tokenizer
    for trial in range(4):
        model = (tiny_llama if family == "llama" else tiny_opt)(len(tokenizer), seed=trial)
        titles = rng.sample(TITLES, rng.randint(3, 8))
        linker = make_linker(model, tokenizer, titles, num_beams=len(titles), device=device)
        m = mention(trial, rng.choice(TEXTS), rng.choice(["Paris", "Jordan", "Amazon", "Queen"]))
        result = linker.link([m], top_k=len(titles))[0]
        assert {c.title for c in result.candidates} <= set(titles)
        assert len({c.title for c in result.candidates}) == len(result.candidates)  # no repeats
        assert len(result.candidates) == len(titles)  # every title finished, none lost
        scores = exhaustive_scores(linker, m)
        best = max(range(len(titles)), key=lambda i: scores[i])
        assert result.candidates[0].title == linker.kb.titles[best]
        for c in result.candidates:
            assert c.score == pytest.approx(scores[linker.kb.title_index(c.title)], abs=1e-4)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_exhaustive_beam_over_every_path(family, qwen_tokenizer, gemma_tokenizer):
    """Tokenizers whose newline merges with a title's end (Qwen-style ")\n", Gemma-style
    SentencePiece with byte fallback): with beams >= titles the search equals the argmax over
    every path of every title, a title's score is its best path's teacher-forced score, no title
    comes twice, and candidate-restricted search (sub-tries) keeps every path of its titles."""
    from tests.conftest import MERGE_TITLES

    tokenizer = qwen_tokenizer if family == "qwen" else gemma_tokenizer
    rng = random.Random(1)
    merged_best = 0
    newline = tokenizer("x\n", add_special_tokens=False)["input_ids"][-1]
    for trial in range(4):
        model = tiny_llama(len(tokenizer), seed=trial)
        if trial >= 2:  # a model that likes the lone newline: the `title + "\n"` path can win
            head = torch.nn.Linear(32, len(tokenizer), bias=True)
            with torch.no_grad():
                head.weight.copy_(model.lm_head.weight)
                head.bias.zero_()
                head.bias[newline] = 8.0
            model.lm_head = head
        linker = make_linker(model, tokenizer, MERGE_TITLES, num_beams=len(MERGE_TITLES))
        trie = linker.trie
        assert len(trie.terminator_merged) >= 3
        m = mention(trial, rng.choice(TEXTS), rng.choice(["Queen", "Amazon", "Star Trek"]))
        result = linker.link([m], top_k=len(MERGE_TITLES))[0]
        titles = [c.title for c in result.candidates]
        assert sorted(titles) == sorted(MERGE_TITLES)  # each title once, none lost
        scores = exhaustive_scores(linker, m)
        assert titles[0] == MERGE_TITLES[max(range(len(scores)), key=scores.__getitem__)]
        for c in result.candidates:
            assert c.score == pytest.approx(scores[linker.kb.title_index(c.title)], abs=1e-4)
        embeds, mask = linker.model.embed([linker.builder.build(m)])
        fused = score_titles(linker.backend, embeds, mask, trie, [range(len(MERGE_TITLES))])[0]
        assert fused == pytest.approx(scores, abs=1e-4)  # fusion scores a title the same way
        single = linker.backend.score(embeds, mask,
                                      [[trie.sequence(i) for i in range(len(scores))]])[0]
        merged_best += sum(s > single[i] + 1e-6 for i, s in enumerate(scores))  # a 2nd path won
        chosen = [0, 2, 4, 7]
        sub = linker.backend.search(embeds, mask, [trie.subtrie(chosen)], num_beams=len(chosen),
                                    top_k=len(chosen))[0]
        assert sorted(h.title_index for h in sub) == chosen
        for h in sub:
            assert h.logprob == pytest.approx(scores[h.title_index], abs=1e-4)
    assert merged_best > 0  # the case is exercised: somewhere the non-natural path scored best


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_candidates_are_titles_with_small_beams(family, llama_pair, opt_pair):
    model, tokenizer = llama_pair if family == "llama" else opt_pair
    linker = make_linker(model, tokenizer, TITLES, num_beams=3)
    results = linker.link([mention(i, t, "Paris") for i, t in enumerate(TEXTS)], top_k=3)
    for r in results:
        assert 1 <= len(r.candidates) <= 3
        assert all(c.title in TITLES for c in r.candidates)
        assert [c.score for c in r.candidates] == sorted((c.score for c in r.candidates), reverse=True)


def test_batching_and_left_padding_do_not_change_results(llama_pair):
    """A mention linked alone or beside longer prompts gets the same candidates and scores."""
    model, tokenizer = llama_pair
    linker = make_linker(model, tokenizer, TITLES, num_beams=4)
    ms = [mention(0, "Paris.", "Paris"), mention(1, TEXTS[2] + " " + TEXTS[0], "London")]
    together = linker.link_batch(ms)
    alone = [linker.link_batch([m])[0] for m in ms]
    for a, b in zip(together, alone):
        assert [c.title for c in a.candidates] == [c.title for c in b.candidates]
        for x, y in zip(a.candidates, b.candidates):
            assert x.score == pytest.approx(y.score, abs=1e-4)


def test_matches_transformers_generate(opt_pair):
    """Our search and `generate(prefix_allowed_tokens_fn=...)` find the same best title."""
    model, tokenizer = opt_pair
    titles = TITLES[:12]
    linker = make_linker(model, tokenizer, titles, num_beams=len(titles))
    trie = linker.trie
    for i, text in enumerate(TEXTS):
        m = mention(i, text, "Paris")
        embeds, mask = linker.model.embed([linker.builder.build(m)])

        def allowed(batch_id, generated):  # with inputs_embeds only, `generated` holds new tokens
            toks = trie.allowed(generated.tolist())
            return toks.tolist() if len(toks) else [trie.terminator]

        out = model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=len(titles),
                             num_return_sequences=1, max_new_tokens=32, do_sample=False,
                             prefix_allowed_tokens_fn=allowed, eos_token_id=trie.terminator,
                             pad_token_id=tokenizer.pad_token_id, length_penalty=0.0)
        seq = out[0].tolist()
        seq = seq[:seq.index(trie.terminator) + 1]
        ours = linker.link([m], top_k=1)[0].candidates[0]
        assert trie.value(trie.node_of(seq)) == linker.kb.title_index(ours.title)


def test_terminator_is_template_newline_not_eos(opt_pair):
    model, tokenizer = opt_pair
    linker = make_linker(model, tokenizer, TITLES)
    nl = tokenizer("x\n", add_special_tokens=False)["input_ids"][-1]
    assert linker.trie.terminator == nl != tokenizer.eos_token_id


def test_dtype_choice_on_cpu():
    from gemel.machine import cpu_has_fast_bf16, pick_dtype

    assert pick_dtype("cpu", "fp32") is torch.float32
    assert pick_dtype("cpu") is (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)


def test_image_slots_need_an_embedder(llama_pair):
    model, tokenizer = llama_pair
    gm = GemelModel(tokenizer, model.get_input_embeddings())
    builder = PromptBuilder("gemel", tokenizer, use_images=True)
    prompt = builder.build(Mention("1", "a photo", "Paris", image="/nonexistent.jpg"))
    with pytest.raises(ValueError, match="image embedder"):
        gm.embed([prompt])
    # without an image the text-only layout is used: no slot at all
    assert all(isinstance(s, str) for s in builder.build(Mention("2", "t", "Paris")).segments)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_scoring_after_search_reuses_the_prefill_and_agrees(family, llama_pair, opt_pair):
    """A stepper's score() after its search (keep_prefill=True) equals a fresh score(), in passes
    of any size, and agrees with the beam search's own scores for the titles it found."""
    from gemel.backends.hf import HFStepper
    from gemel.beam import beam_search

    model, tok = llama_pair if family == "llama" else opt_pair
    linker = make_linker(model, tok, TITLES, num_beams=3)
    ms = [mention(i, t, t.split()[0]) for i, t in enumerate(TEXTS[:3])]
    embeds, mask = linker.model.embed([linker.builder.build(m) for m in ms])
    seqs = [[linker.trie.sequence(i) for i in range(len(TITLES)) if (i + p) % 2] for p in range(3)]
    fresh = linker.backend.score(embeds, mask, seqs)
    stepper = linker.backend.stepper(embeds, mask, keep_prefill=True)
    hyps = beam_search(stepper, linker.trie, len(ms), num_beams=3, top_k=3)
    assert stepper.prefill is not None
    reused = stepper.score(seqs)
    assert stepper.prefill is None  # used once, then dropped
    for a, b in zip(fresh, reused):
        assert a == pytest.approx(b, abs=1e-4)
    small = HFStepper(model, embeds, mask).score(seqs, rows_per_pass=5)
    for a, b in zip(fresh, small):
        assert a == pytest.approx(b, abs=1e-4)
    paths = [linker.trie.paths(i) for i in range(len(TITLES))]
    every = linker.backend.score(embeds, mask, [[q for ps in paths for q in ps]] * 3)
    best = score_titles(linker.backend, embeds, mask, linker.trie, [range(len(TITLES))] * 3)
    for p, hs in enumerate(hyps):  # a title's search score: one of its paths' (3 beams: not
        for h in hs:               # always the best one), and at most the best of them
            forced = dict(zip(map(tuple, (q for ps in paths for q in ps)), every[p]))
            assert any(len(q) == h.n_tokens and h.logprob == pytest.approx(forced[tuple(q)], abs=1e-4)
                       for q in paths[h.title_index])
            assert h.logprob <= best[p][h.title_index] + 1e-4
    if family == "llama":  # the SentencePiece-style tokenizer merges "Kingdom" with the newline
        assert any(len(ps) > 1 for ps in paths)


def full_forward_scores(model, embeds, mask, sequences) -> list[list[float]]:
    """Reference: each (prompt, sequence) run from scratch, no cache, full log-softmax."""
    out = []
    emb = model.get_input_embeddings()
    for p, seqs in enumerate(sequences):
        prompt = embeds[p][mask[p].bool()]
        row = []
        for seq in seqs:
            x = torch.cat([prompt, emb(torch.tensor(seq))])[None]
            with torch.no_grad():
                logp = model(inputs_embeds=x).logits[0].float().log_softmax(-1)
            start = prompt.shape[0] - 1
            row.append(sum(logp[start + i, t].item() for i, t in enumerate(seq)))
        out.append(row)
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_scores_equal_a_full_forward_without_cache(family, shared, llama_pair, opt_pair):
    """Teacher-forced scores (shared prompt prefix or expanded cache, logits only where a token is
    scored, in vocabulary blocks) equal a plain forward of prompt + title with a full log-softmax,
    for left-padded prompts of different lengths and titles of different lengths."""
    from gemel.backends import hf

    model, tok = llama_pair if family == "llama" else opt_pair
    linker = make_linker(model, tok, TITLES, num_beams=3)
    ms = [mention(0, "Paris.", "Paris"), mention(1, TEXTS[2] + " " + TEXTS[0], "London"),
          mention(2, TEXTS[1], "Amazon")]
    embeds, mask = linker.model.embed([linker.builder.build(m) for m in ms])
    seqs = [[linker.trie.sequence(i) for i in range(len(TITLES)) if (i + p) % 3] for p in range(3)]
    stepper = hf.HFStepper(model, embeds, mask)
    stepper.shared = shared and stepper.shared
    assert stepper.shared == shared  # both paths run on these models
    got = stepper.score(seqs, rows_per_pass=5)
    want = full_forward_scores(model, embeds, mask, seqs)
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shared_prefix_search_equals_expanded_cache_search(family, llama_pair, opt_pair):
    """The beam search over a shared prompt prefix finds the same titles with the same scores as
    the search that expands and reorders the prompt cache per row."""
    from gemel.backends import hf
    from gemel.beam import beam_search

    model, tok = llama_pair if family == "llama" else opt_pair
    linker = make_linker(model, tok, TITLES, num_beams=4)
    ms = [mention(i, t, t.split()[0]) for i, t in enumerate(TEXTS)]
    embeds, mask = linker.model.embed([linker.builder.build(m) for m in ms])
    found = []
    for shared in (True, False):
        stepper = hf.HFStepper(model, embeds, mask)
        stepper.shared = shared
        found.append(beam_search(stepper, linker.trie, len(ms), num_beams=4, top_k=4))
    for a, b in zip(*found):
        assert [h.title_index for h in a] == [h.title_index for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_link_sorts_batches_by_length_and_keeps_input_order(llama_pair):
    """link() batches prompts of similar length together, and returns results in input order,
    each the same as linking that mention alone."""
    model, tokenizer = llama_pair
    linker = make_linker(model, tokenizer, TITLES, num_beams=3, batch_size=2)
    texts = [TEXTS[2] + " " + TEXTS[0], "Paris.", TEXTS[1], TEXTS[3] + " " + TEXTS[1] + " " + TEXTS[0], "Queen."]
    ms = [mention(i, t, t.split()[0].strip(".")) for i, t in enumerate(texts)]
    batched = []
    original = linker.link_batch

    def spy(batch, *args, **kwargs):
        batched.append([m.id for m in batch])
        return original(batch, *args, **kwargs)

    linker.link_batch = spy
    results = linker.link(ms)
    assert [r.mention_id for r in results] == [m.id for m in ms]
    assert batched[0] == ["1", "4"]  # the two shortest prompts share the first batch
    for r, m in zip(results, ms):
        alone = original([m])[0]
        assert [c.title for c in r.candidates] == [c.title for c in alone.candidates]
        assert [c.score for c in r.candidates] == pytest.approx([c.score for c in alone.candidates],
                                                                abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prefill_head_is_one_matrix_product(family, llama_pair, opt_pair):
    """The prefill's first-token log-probabilities are the head applied to the last hidden state of
    each left-padded prompt as one [n, hidden] matrix (a [n, 1, hidden] slice would make matmul
    copy the head's weight n times), and equal a plain forward's."""
    from gemel.backends import hf

    model, tok = llama_pair if family == "llama" else opt_pair
    linker = make_linker(model, tok, TITLES, num_beams=3)
    ms = [mention(0, "Paris.", "Paris"), mention(1, TEXTS[2] + " " + TEXTS[0], "London")]
    embeds, mask = linker.model.embed([linker.builder.build(m) for m in ms])
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        first = hf.HFStepper(model, embeds, mask).start()
    finally:
        hook.remove()
    assert shapes == [(2, model.config.hidden_size)]
    for p in range(2):
        prompt = embeds[p][mask[p].bool()][None]
        with torch.no_grad():
            want = model(inputs_embeds=prompt).logits[0, -1].float().log_softmax(-1)
        assert torch.allclose(first[p], want, atol=1e-4)
