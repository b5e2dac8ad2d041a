"""Templates as data: validation at load time, segments with image slots, token budget."""
from __future__ import annotations

import pytest

from gemel.errors import DataError, GemelError
from gemel.prompting import ImageSlot, PromptBuilder, load_template, template_names
from gemel.types import Mention

Q = Mention("q", "Obama visited Paris.", "Obama", entity="Barack Obama")
DEMOS = [Mention(f"d{i}", f"Sentence number {i} about Paris.", "Paris", entity="Paris")
         for i in range(6)]


def test_shipped_templates_load():
    assert {"gemel", "gemel_vp", "gemel_chat"} <= set(template_names())
    t = load_template("gemel")
    assert t.answer_prefix == "[Answer]" and t.after_answer == "\n" and not t.chat
    assert load_template("gemel_chat").chat


def test_gemel_layout_exact():
    text = "".join(PromptBuilder("gemel").build(Q, DEMOS[:1]).segments)
    assert text == ("[Text]Sentence number 0 about Paris.\n[Question]What does Paris mentioned in the "
                    "text refer to?\n[Answer]Paris\n[Text]Obama visited Paris.\n[Question]What does "
                    "Obama mentioned in the text refer to?\n[Answer]")


@pytest.mark.parametrize("body, match", [
    ("[Text]{text} {colour}\n[Answer]{entity}\n", "unknown placeholder"),
    ("[Text]{text}\n[Answer]\n", "exactly once"),
    ("[Answer]{entity} {text}\n", "last placeholder"),
    ("#! style: fancy\n[Text]{text}[Answer]{entity}\n", "unknown directive"),
])
def test_bad_templates_name_the_file(tmp_path, body, match):
    path = tmp_path / "mine.txt"
    path.write_text(body)
    with pytest.raises(DataError, match=match) as err:
        load_template(str(path))
    assert "mine.txt" in str(err.value)


def test_unknown_template_lists_shipped():
    with pytest.raises(GemelError, match="gemel_vp"):
        load_template("nope")


def test_image_slots_per_demonstration():
    b = PromptBuilder("gemel", use_images=True)
    demos = [Mention("d", "t", "m", image="/a.jpg", entity="E"), Mention("e", "t", "m", entity="F")]
    segs = b.build(Mention("q", "t", "m", image="/b.jpg"), demos).segments
    slots = [s for s in segs if isinstance(s, ImageSlot)]
    assert [s.mention.id for s in slots] == ["d", "q"]  # the demo without an image has no slot
    assert isinstance(segs[0], ImageSlot)


def test_budget_drops_least_similar_first(bpe_tokenizer):
    full = PromptBuilder("gemel", bpe_tokenizer)
    n_all = full.n_tokens(full.build(Q, DEMOS))
    n_two = full.n_tokens(full.build(Q, DEMOS[-2:]))
    b = PromptBuilder("gemel", bpe_tokenizer, max_tokens=n_two)
    p = b.build(Q, DEMOS)
    assert n_two < n_all
    assert [d.id for d in p.demonstrations] == ["d4", "d5"]  # the most similar are kept
    tiny = PromptBuilder("gemel", bpe_tokenizer, max_tokens=3).build(Q, DEMOS)
    assert tiny.demonstrations == [] and "Obama visited Paris." in "".join(tiny.segments)


def test_chat_template_wraps_turns_and_terminator(bpe_tokenizer):
    tok = bpe_tokenizer
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        b = PromptBuilder("gemel_chat", tok)
        text = "".join(b.build(Q, DEMOS[:1]).segments)
        assert text.startswith("<|user|>[Text]Sentence number 0")
        assert "<|assistant|>[Answer]Paris</s>" in text
        assert text.endswith("<|assistant|>[Answer]")
        assert b.terminator_text.startswith("</s>")
    finally:
        tok.chat_template = None


def test_chat_template_without_tokenizer_template(bpe_tokenizer):
    with pytest.raises(GemelError, match="chat template"):
        PromptBuilder("gemel_chat", bpe_tokenizer)
