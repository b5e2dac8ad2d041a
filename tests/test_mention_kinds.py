"""Text mentions and box-only mentions in one model: the template block per mention kind, and how
the linker treats a mention that only a box marks."""
from __future__ import annotations

import pytest
from PIL import Image

from gemel.backends.hf import HFBackend
from gemel.errors import DataError
from gemel.kb import KnowledgeBase
from gemel.linker import Linker, LinkerConfig
from gemel.prompting import ImageSlot, PromptBuilder, load_template, mention_kind, parse_template
from gemel.types import Entity, Mention
from tests.conftest import TITLES

KB = KnowledgeBase.from_entities(Entity(f"Q{i}", t) for i, t in enumerate(TITLES))
TEXT_Q = "[Question]What does Obama mentioned in the text refer to?"
BOX_Q = "[Question]What does the entity marked in the image refer to?"


@pytest.fixture()
def kinds(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(path)
    img = str(path)
    return {"text": Mention("t", "Obama visited Paris.", "Obama", image=img, entity="Barack Obama"),
            "box": Mention("b", "Two emblems.", None, image=img, bbox=(1, 1, 9, 9),
                           entity="Paris"),
            "poly": Mention("p", "Two emblems.", "", image=img, polygon=((1, 1), (9, 1), (5, 9)),
                            entity="London"),
            "both": Mention("x", "Obama visited Paris.", "Obama", image=img, bbox=(1, 1, 9, 9),
                            entity="Barack Obama")}


def test_kind_of_a_mention(kinds):
    assert [mention_kind(kinds[k], True) for k in ("text", "box", "poly", "both")] == \
        ["text", "box", "box", "both"]
    # without images the region is not seen: a named mention is a text mention
    assert mention_kind(kinds["both"], False) == "text"
    assert mention_kind(kinds["box"], False) == "box"


def test_each_mention_gets_its_own_block_query_and_demonstrations(kinds):
    builder = PromptBuilder("gemel", use_images=True, image_tokens=4)
    prompt = builder.build(kinds["box"], [kinds["text"], kinds["poly"], kinds["both"]])
    text = "".join(s for s in prompt.segments if isinstance(s, str))
    # demonstrations keep their own kind and their own image
    assert text.count(TEXT_Q.replace("?", "")[:30]) == 2  # the text demo and the both demo
    assert "What does Obama mentioned in the text and marked in the image refer to?" in text
    assert text.count(BOX_Q) == 2  # the polygon demo and the box query
    assert text.endswith(BOX_Q + "\n[Answer]")
    slots = [s.mention.id for s in prompt.segments if isinstance(s, ImageSlot)]
    assert slots == ["t", "p", "x", "b"]
    assert "What does  mentioned" not in text and "None" not in text
    # a text query under the same template renders GEMEL's question exactly as before
    text_only = "".join(PromptBuilder("gemel").build(kinds["text"]).segments)
    assert text_only == "[Text]Obama visited Paris.\n" + TEXT_Q + "\n[Answer]"


def test_a_box_only_mention_never_asks_about_an_empty_mention(kinds, tmp_path):
    path = tmp_path / "textonly.txt"
    path.write_text("[Text]{text}\n[Question]What does {mention} mentioned in the text refer to?\n"
                    "[Answer]{entity}\n")
    builder = PromptBuilder(str(path), use_images=False)
    with pytest.raises(DataError, match="no mention string") as err:
        builder.build(kinds["box"])
    assert "form: box" in str(err.value)
    with pytest.raises(DataError, match="no mention string"):  # nor as a demonstration
        builder.build(kinds["text"], [kinds["poly"]])
    # gemel_vp has one block for every kind, without {mention}
    vp = "".join(s for s in PromptBuilder("gemel_vp").build(kinds["box"]).segments)
    assert BOX_Q in vp
    # and gemel's box block is gemel_vp's block: box-only mentions get the same prompt from either
    # (benchmarks/visual_prompts.py trains the mixed run's mapper with gemel on that ground)
    assert load_template("gemel").forms["box"] == load_template("gemel_vp").block


@pytest.mark.parametrize("body, match", [
    ("#! form: text\n[Text]{text}\n[Answer]{entity}\n#! form: box\n[Text]{text}\n[Reply]{entity}\n",
     "answer prefix"),
    ("#! form: text\n[Text]{text}\n[Answer]{entity}\n#! form: box\n{text} {mention}\n[Answer]{entity}\n",
     "cannot use"),
    ("#! form: text\n[Text]{text}\n[Answer]{entity}\n#! form: text\n{text}\n[Answer]{entity}\n",
     "given twice"),
    ("[Text]{text}\n#! form: box\n{text}\n[Answer]{entity}\n", "belongs to no form"),
    ("#! form: sketch\n[Text]{text}\n[Answer]{entity}\n", "unknown"),
])
def test_bad_forms_name_the_problem(body, match):
    with pytest.raises(DataError, match=match):
        parse_template(body, source="mine.txt")


def test_forms_share_the_answer_line_and_chat_has_them_too():
    for name in ("gemel", "gemel_chat"):
        t = load_template(name)
        assert set(t.forms) == {"text", "box", "both"}
        assert t.answer_prefix == "[Answer]"


def test_box_only_mention_without_an_image_model_is_an_error_row(llama_pair, kinds):
    model, tok = llama_pair
    linker = Linker(LinkerConfig(model="tiny", num_beams=2, top_k=2), KB, HFBackend(model, tok))
    ms = [kinds["text"], kinds["box"], kinds["poly"], kinds["both"]]
    results = linker.link(ms)
    assert [r.mention_id for r in results] == ["t", "b", "p", "x"]
    assert results[0].error is None and results[0].candidates
    assert results[3].error is None and results[3].candidates  # named: linked from its text
    for r in results[1:3]:
        assert not r.candidates and "--mapper" in r.error and "no mention string" in r.error
    assert linker.box_only_from_text == 0
    # the text mentions' answers are those of a run over them alone
    alone = linker.link([kinds["text"], kinds["both"]])
    assert [r.candidates for r in alone] == [results[0].candidates, results[3].candidates]
