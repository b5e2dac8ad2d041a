"""The bad-input table: one list of cases, run through the `gemel` CLI (click's CliRunner).

``tests/test_bad_inputs.py`` asserts every case (exit code, message fragments naming the file,
line and field); ``benchmarks/bad_inputs_table.py`` prints the same cases as a Markdown table
with the messages gemel actually gave. Each case writes its inputs into its own folder and
returns the CLI arguments; the models are tiny random ones built by :func:`build_env`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
KB_LINES = (REPO / "examples" / "kb.jsonl").read_text(encoding="utf-8").splitlines()
GOOD = {"id": "m1", "text": "Thousands of tourists visit Paris.", "mention": "Paris",
        "image": None, "bbox": None, "polygon": None, "entity_id": "Q90", "entity": "Paris"}


def _error_rows_exit() -> int:
    """The exit code of a run that finished with error rows (gemel.cli.EXIT_ERROR_ROWS where
    the CLI defines one; a run with error rows exited 0 before)."""
    import gemel.cli

    return int(getattr(gemel.cli, "EXIT_ERROR_ROWS", 0))


ROWS = _error_rows_exit()


@dataclass
class Env:
    """Tiny models and artefacts shared by the cases (built once, see :func:`build_env`)."""

    root: Path
    model: Path  # tiny LLaMA + SentencePiece-style tokenizer (the model every case links with)
    other_model: Path  # tiny OPT + byte-level BPE tokenizer
    clip: Path  # tiny CLIP vision tower
    mapper: Path  # a `gemel train --out` folder: best/ holds a mapper for `model`
    other_mapper: Path  # a mapper checkpoint trained for `other_model`
    trie_other_tokenizer: Path  # a trie of the examples KB built for `other_model`
    trie_other_kb: Path  # a trie for `model`, of another KB
    image: Path  # a 32x32 PNG
    corrupt_image: Path  # a .png that is not an image


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what is wrong with the input, in words
    make: Callable[[Path, Env], list[str]]  # writes the case's files, returns the CLI arguments
    expect: tuple[str, ...]  # fragments of the output or of the predictions' error rows
    exit_code: int
    env: dict = field(default_factory=dict)  # environment variables for the run
    area: str = "baddata"  # which part of gemel the case checks: bad data, visual linking


# -- writing inputs ---------------------------------------------------------------------------------
def write_lines(path: Path, lines: list) -> str:
    """Lines as given: dicts as JSON, str as text, bytes as bytes (to write bad encodings)."""
    raw = b"".join((json.dumps(x, ensure_ascii=False).encode() if isinstance(x, dict)
                    else x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
    path.write_bytes(raw)
    return str(path)


def kb_file(d: Path, extra: list | None = None, base: bool = True) -> str:
    return write_lines(d / "kb.jsonl", (list(KB_LINES) if base else []) + (extra or []))


def mentions_file(d: Path, lines: list, name: str = "mentions.jsonl") -> str:
    return write_lines(d / name, lines)


def link(d: Path, env: Env, kb: str | None = None, data: str | None = None, *more: str,
         model: str | None = None) -> list[str]:
    return ["link", "--kb", kb or kb_file(d), "--data", data or mentions_file(d, [GOOD]),
            "--out", str(d / "pred.jsonl"), "--model", model or str(env.model), "--beams", "2",
            "--top-k", "2", "--no-progress", *more]


def with_line(**changes) -> dict:
    return {**GOOD, "id": "m2", **changes}


def config_file(d: Path, text: str) -> str:
    (d / "config.yaml").write_text(text, encoding="utf-8")
    return str(d / "config.yaml")


# -- the cases --------------------------------------------------------------------------------------
def _cases() -> list[Case]:
    C = Case
    cases = [
        # ---- the KB: bad records skipped and reported; --strict makes them errors -----------
        C("kb-bad-json", "KB: a line that is not JSON",
          lambda d, e: link(d, e, kb_file(d, ['{"id": "Q1", "title": "Paris"']), None),
          ("kb.jsonl, record line 42: not valid JSON", "1 bad KB records skipped"), 0),
        C("kb-bad-json-strict", "KB: a line that is not JSON, with --strict",
          lambda d, e: link(d, e, kb_file(d, ['{"id": "Q1", "title": "Paris"']), None, "--strict"),
          ("kb.jsonl, record line 42: not valid JSON",), 2),
        C("kb-missing-title", "KB: a record without a title",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1"}]), None),
          ("kb.jsonl, record line 42, field 'title': the title must be a non-empty string, "
           "got missing",), 0),
        C("kb-title-type", "KB: a title that is a number",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1", "title": 7}]), None),
          ("record line 42, field 'title'", "7 (int)"), 0),
        C("kb-id-type", "KB: an id that is a list",
          lambda d, e: link(d, e, kb_file(d, [{"id": ["Q1"], "title": "X"}]), None),
          ("record line 42, field 'id': the entity id must be a non-empty string",), 0),
        C("kb-aliases-type", "KB: aliases given as one string",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1", "title": "X", "aliases": "Y"}]), None),
          ("record line 42, field 'aliases': expected a list of strings",), 0),
        C("kb-empty-title", "KB: a whitespace title",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1", "title": "   "}]), None),
          ("record line 42, field 'title'", "'   '"), 0),
        C("kb-duplicate-id", "KB: an id given twice",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q90", "title": "Paris again"}]), None),
          ("record line 42, field 'id': duplicate id 'Q90' (first on line 1)",), 0),
        C("kb-duplicate-id-strict", "KB: an id given twice, with --strict",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q90", "title": "Paris again"}]), None,
                            "--strict"),
          ("record line 42, field 'id': duplicate id 'Q90' (first on line 1)",), 2),
        C("kb-duplicate-title", "KB: two entities sharing a title (allowed, reported)",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q999", "title": "Paris"}]), None),
          ("1 KB title(s) are shared by 2 entities",), 0),
        C("kb-empty", "KB: an empty file",
          lambda d, e: link(d, e, kb_file(d, [], base=False), None),
          ("kb.jsonl: the KB has no entities",), 2),
        C("kb-all-bad", "KB: every record bad",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1"}], base=False), None),
          ("kb.jsonl: the KB has no entities (1 bad records skipped",), 2),
        C("kb-latin1", "KB: a Latin-1 line (not UTF-8)",
          lambda d, e: link(d, e, kb_file(d, ['{"id": "Q1", "title": "Caf\xe9"}'.encode("latin-1")]),
                            None),
          ("kb.jsonl, record line 42, field 'encoding': not UTF-8: byte 0xe9 at column 27",
           "iconv -f WINDOWS-1252 -t UTF-8"), 0),
        C("kb-utf16", "KB: a UTF-16 file",
          lambda d, e: link(d, e, str(_utf16(d / "kb.jsonl", KB_LINES)), None),
          ("kb.jsonl, field 'encoding': the file is UTF-16", "iconv -f UTF-16 -t UTF-8"), 2),
        C("kb-long-title", "KB: a title longer than max_new_tokens (can never be generated)",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1", "title": "Parliament of the United "
                                                "Kingdom and Amazon River and Tower Bridge"}]),
                            None, "--config", config_file(d, "max_new_tokens: 12\n")),
          ("KB title(s) take more than max_new_tokens=12 tokens and can never be generated",), 0),
        C("kb-long-title-strict", "KB: a title longer than max_new_tokens, with --strict",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q1", "title": "Parliament of the United "
                                                "Kingdom and Amazon River and Tower Bridge"}]),
                            None, "--strict", "--config", config_file(d, "max_new_tokens: 12\n")),
          ("can never be generated",), 2),
        C("kb-unicode-rtl", "KB and mention in Arabic and Hebrew (right-to-left): must work",
          lambda d, e: link(d, e, kb_file(d, [{"id": "Q85", "title": "القاهرة"},
                                              {"id": "Q1218", "title": "ירושלים"}], base=False),
                            mentions_file(d, [{**GOOD, "text": "زرت القاهرة", "mention": "القاهرة",
                                               "entity_id": "Q85", "entity": "القاهرة"}])),
          ('"gold_id": "Q85"', "linked 1 mentions"), 0),
        # ---- the mentions to link: a bad record becomes an error row, the run goes on --------
        C("mention-bad-json", "mentions: a line that is not JSON",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, '{"id": "m2", "text": '])),
          ("mentions.jsonl, record line 2: not valid JSON", '"id": "<line 2>"'), ROWS),
        C("mention-not-object", "mentions: a line holding a JSON list",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, "[1, 2]"])),
          ("mentions.jsonl, record line 2: expected a JSON object, got list",), ROWS),
        C("mention-missing-text", "mentions: a record without its text",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, {"id": "m2", "mention": "Paris"}])),
          ("record line 2 (id 'm2'), field 'text': expected a string, got missing",), ROWS),
        C("mention-type", "mentions: a mention that is a number",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(mention=5)])),
          ("record line 2 (id 'm2'), field 'mention': expected a string or null, got a int",),
          ROWS),
        C("mention-blank", "mentions: a blank mention and no image",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(mention=" ")])),
          ("record line 2 (id 'm2'), field 'mention': nothing marks the mention",), ROWS),
        C("mention-unknown-field", "mentions: a misspelt field",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, {**with_line(), "mentoin": "x"}])),
          ("record line 2 (id 'm2'), field 'mentoin': unknown field(s) ['mentoin']",), ROWS),
        C("mention-id-type", "mentions: an id that is an object",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(id={"a": 1})])),
          ("record line 2, field 'id': the mention id must be a non-empty string",
           '"id": "<line 2>"'), ROWS),
        C("mention-bbox-degenerate", "mentions: a bbox with x1 < x0",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              image="img.png", bbox=[10, 0, 5, 8])])),
          ("record line 2 (id 'm2'), field 'bbox': empty box [10, 0, 5, 8]",), ROWS),
        C("mention-bbox-length", "mentions: a bbox of 3 numbers",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              image="img.png", bbox=[1, 2, 3])])),
          ("field 'bbox': expected 4 numbers [x0, y0, x1, y1]",), ROWS),
        C("mention-polygon-2", "mentions: a polygon of 2 points",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              image="img.png", polygon=[[0, 0], [4, 4]])])),
          ("record line 2 (id 'm2'), field 'polygon': expected 3 or more [x, y] points",), ROWS),
        C("mention-bbox-no-image", "mentions: a bbox without an image",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(bbox=[0, 0, 4, 4])])),
          ("field 'image': a bbox or polygon marks a region of an image, but 'image' is null",),
          ROWS),
        C("mention-latin1", "mentions: a Latin-1 line (not UTF-8)",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, json.dumps(with_line(
              text="Un café à Paris"), ensure_ascii=False).encode("latin-1")])),
          ("mentions.jsonl, record line 2, field 'encoding': not UTF-8: byte 0xe9",
           "iconv -f WINDOWS-1252"), ROWS),
        C("mention-latin1-strict", "mentions: a Latin-1 line, with --strict",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, json.dumps(with_line(
              text="Un café à Paris"), ensure_ascii=False).encode("latin-1")]), "--strict"),
          ("record line 2, field 'encoding': not UTF-8",), 2),
        C("mention-duplicate-id", "mentions: an id given twice (predictions are keyed by id)",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, GOOD])),
          ("record line 2, field 'id': duplicate mention id 'm1' (first on line 1)",), 2),
        C("mention-empty-file", "mentions: an empty file",
          lambda d, e: link(d, e, None, mentions_file(d, [])),
          ("mentions.jsonl: no mentions to link",), 2),
        C("mention-gold-not-in-kb", "mentions: a gold entity absent from the KB (announced)",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(entity_id="Q404")])),
          ("1 of 2 labelled mentions have a gold entity that is not in the KB", "Q404"), 0),
        C("mention-missing-image", "mentions: an image that is not there (read text-only)",
          lambda d, e: link(d, e, None, mentions_file(d, [with_line(image="gone.jpg")])),
          ("1 of 1 mentions name an image that was not found", "gone.jpg"), 0),
        C("mention-box-only-missing-image", "mentions: a box-only mention whose image is missing",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              mention=None, image="gone.jpg", bbox=[0, 0, 4, 4])])),
          ("record m2, field 'mention': nothing marks the mention",), ROWS),
        C("mention-prompt-too-long", "mentions: a prompt longer than the model's context",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              text="Paris " * 600)])),
          ("record m2, field 'text': the prompt takes", "over the model's context of 512 tokens"),
          ROWS),
        C("wikidiverse-lengths", "WikiDiverse-shaped file: 2 mentions but 1 answer",
          lambda d, e: link(d, e, None, _release(d, "wd.json", [
              {"id": 0, "sentence": "Paris in spring.", "mention": ["Paris"], "entity": ["Paris"],
               "answer": ["Q90"]},
              {"id": 1, "sentence": "Paris and Jordan.", "mention": ["Paris", "Jordan"],
               "entity": ["Paris"], "answer": ["Q90"]}])),
          ("wd.json, record index 1 (id 1), field 'answer': 1 items but 'mention' has 2",), ROWS),
        C("wikimel-blank-mention", "WikiMEL-shaped file: a blank mention, no image",
          lambda d, e: link(d, e, None, _release(d, "wm.json", {
              "1": {"id": "1", "sentence": "Paris in spring.", "mentions": ["Paris"],
                    "entities": ["Paris"], "answer": ["Q90"]},
              "2": {"id": "2", "sentence": "A man.", "mentions": [" "], "entities": ["Paris"],
                    "answer": ["Q90"]}})),
          ("record 2-0, field 'mention': nothing marks the mention",), ROWS),
        C("release-latin1", "a release JSON document that is not UTF-8",
          lambda d, e: link(d, e, None, _release(d, "wd.json", [
              {"id": 0, "sentence": "Un café.", "mention": ["Paris"], "answer": ["Q90"]}],
              encoding="latin-1")),
          ("wd.json, record line 1, field 'encoding': not UTF-8: byte 0xe9",), 2),
        # ---- the demonstration pool: bad records skipped; --strict makes them errors ---------
        C("train-blank-mention", "training pool (--demos): a blank-mention record",
          lambda d, e: link(d, e, None, None, "--train", _train(d), "--demos", "1",
                            "--retriever", "bm25"),
          ("train.jsonl, record line 3 (id 't3'), field 'mention': nothing marks the mention",
           "train.jsonl: 1 bad demonstration records skipped"), 0),
        C("train-blank-mention-strict", "training pool: a blank-mention record, with --strict",
          lambda d, e: link(d, e, None, None, "--train", _train(d), "--demos", "1",
                            "--retriever", "bm25", "--strict"),
          ("train.jsonl, record line 3 (id 't3'), field 'mention': nothing marks the mention",), 2),
        # ---- images at link time (with a mapper) -------------------------------------------
        C("image-corrupt", "mentions: an image file that is not an image (with --mapper)",
          lambda d, e: link(d, e, None, mentions_file(d, [
              with_line(id="m1", image=str(e.image)),
              with_line(image=str(e.corrupt_image))]), "--mapper", str(e.mapper)),
          ("record m2, field 'image': cannot read the image", "corrupt.png"), ROWS),
        C("image-bbox-outside", "mentions: a bbox outside the image (with --mapper)",
          lambda d, e: link(d, e, None, mentions_file(d, [
              with_line(id="m1", image=str(e.image)),
              with_line(image=str(e.image), bbox=[100, 100, 120, 130])]),
              "--mapper", str(e.mapper)),
          ("record m2, field 'bbox': region [100, 100, 120, 130] lies outside the 32x32 image",),
          ROWS),
        # ---- models and artefacts ---------------------------------------------------------
        C("model-hub-offline", "a hub id with no hub",
          lambda d, e: link(d, e, model="facebook/opt-125m"),
          ("cannot load the llm model 'facebook/opt-125m'",
           "offline llm models that need no hub: smollm2-135m-instruct"), 2,
          env={"HF_HUB_OFFLINE": "1"}),
        C("model-missing-gguf", "a .gguf file that does not exist",
          lambda d, e: link(d, e, model=str(d / "nope.gguf")),
          ("nope.gguf does not exist", "offline llm models that need no hub"), 2),
        C("model-missing-folder", "a model folder that does not exist",
          lambda d, e: link(d, e, model="./no-such-model"),
          ("unknown model './no-such-model'", "offline llm models that need no hub"), 2),
        C("mapper-other-llm", "--mapper trained for another LLM",
          lambda d, e: link(d, e, None, None, "--mapper", str(e.other_mapper)),
          ("this mapper was trained for LLM", "differ) — load LLM"), 2),
        C("mapper-not-checkpoint", "--mapper naming a folder that holds no checkpoint",
          lambda d, e: link(d, e, None, None, "--mapper", str(d)),
          ("field 'mapper': not a mapper checkpoint: no mapper.safetensors in it, nor in best/",),
          2),
        C("mapper-template-differs", "--template other than the checkpoint's",
          lambda d, e: link(d, e, None, None, "--mapper", str(e.mapper), "--template",
                            "gemel_chat"),
          ("--template 'gemel_chat' differs from template 'gemel' that the mapper checkpoint",),
          2),
        C("trie-other-tokenizer", "--trie built for another tokenizer",
          lambda d, e: link(d, e, None, None, "--trie", str(e.trie_other_tokenizer)),
          ("was built for tokenizer=",), 2),
        C("trie-other-kb", "--trie built for another KB",
          lambda d, e: link(d, e, None, None, "--trie", str(e.trie_other_kb)),
          ("was built for kb_fingerprint=",), 2),
        C("config-unknown-key", "--config with an unknown key",
          lambda d, e: link(d, e, None, None, "--config", config_file(d, "beam: 3\n")),
          ("config.yaml, field 'beam': unknown key(s) ['beam']",), 2),
        C("config-not-yaml", "--config that is not YAML",
          lambda d, e: link(d, e, None, None, "--config", config_file(d, "a: [1\n")),
          ("config.yaml, record line 2, column 1: not valid YAML: expected ',' or ']'",), 2),
        C("box-only-no-image-model", "mentions: a box-only mention (image and bbox, no mention "
          "string) without --mapper",
          lambda d, e: link(d, e, None, mentions_file(d, [GOOD, with_line(
              mention=None, image="img.png", bbox=[0, 0, 8, 8])])),
          ("linking it needs an image model; pass --mapper CKPT",), ROWS, area="visual"),
    ]
    return cases


def _utf16(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-16"))
    return path


def _release(d: Path, name: str, data, encoding: str = "utf-8") -> str:
    (d / name).write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))
    return str(d / name)


def _train(d: Path) -> str:
    return mentions_file(d, [with_line(id="t1"), with_line(id="t2", mention="Jordan"),
                             with_line(id="t3", mention="")], "train.jsonl")


CASES = _cases()


# -- the shared environment -------------------------------------------------------------------------
def build_env(root: Path) -> Env:
    """Tiny models, mapper checkpoints and tries under ``root`` (a few seconds on a CPU)."""
    import torch
    from PIL import Image

    from gemel.kb import KnowledgeBase
    from gemel.trie_store import build_trie
    from gemel.mapper import LinearMapper, llm_identity
    from gemel.prompting import PromptBuilder, load_template
    from gemel.vision import VisionEncoder
    from tests.conftest import make_bpe_tokenizer, make_sp_tokenizer, tiny_llama, tiny_opt
    from tests.test_train import tiny_clip

    root.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name, tok, make in (("llama", make_sp_tokenizer(), tiny_llama),
                            ("opt", make_bpe_tokenizer(), tiny_opt)):
        folder = root / name
        llm = make(len(tok))
        llm.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[name] = (folder, llm, tok)
    clip_dir = root / "clip"
    clip = tiny_clip()
    clip.model.save_pretrained(clip_dir)
    clip.processor.save_pretrained(clip_dir)
    vision = VisionEncoder.from_name(str(clip_dir))
    template = load_template("gemel")

    def save_mapper(out: Path, which: str) -> Path:
        folder, llm, _ = folders[which]
        torch.manual_seed(0)
        meta = {"vision": vision.identity, "feature": vision.feature,
                "llm": llm_identity(llm, name=str(folder)), "vp_mode": "overlay",
                "template": template.name, "template_block": template.block}
        LinearMapper(vision.feature_dim, llm.config.hidden_size, 2, meta=meta).save(out)
        return out

    save_mapper(root / "train-out" / "best", "llama")
    save_mapper(root / "other-mapper", "opt")
    kb = KnowledgeBase.from_jsonl(REPO / "examples" / "kb.jsonl")
    other_kb = KnowledgeBase.from_entities(list(kb)[:5])
    tries = {}
    for name, which, of in (("trie-other-tokenizer", "opt", kb), ("trie-other-kb", "llama", other_kb)):
        tok = folders[which][2]
        builder = PromptBuilder(template, tok)
        build_trie(of, tok, builder.answer_prefix, builder.terminator_text).save(root / name)
        tries[name] = root / name
    image = root / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"this is not a PNG")
    return Env(root, folders["llama"][0], folders["opt"][0], clip_dir, root / "train-out",
               root / "other-mapper", tries["trie-other-tokenizer"], tries["trie-other-kb"],
               image, corrupt)


def run_case(case: Case, env: Env, folder: Path) -> tuple[int, str]:
    """Run one case through the CLI; (exit code, output + the predictions' error messages)."""
    from click.testing import CliRunner

    from gemel.cli import cli

    folder.mkdir(parents=True, exist_ok=True)
    # the case's files (img.png for bbox/polygon lines) beside its mentions
    (folder / "img.png").write_bytes(env.image.read_bytes())
    args = case.make(folder, env)
    result = CliRunner().invoke(cli, args, env=case.env or None)
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\nTRACEBACK {type(result.exception).__name__}: {result.exception}"
    pred = folder / "pred.jsonl"
    if pred.exists():  # error rows whole, other rows by id, gold and top candidate
        for line in pred.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            shown = row if row.get("error") else {
                "id": row["id"], "gold_id": row["gold_id"],
                "top": row["candidates"][0]["title"] if row["candidates"] else None}
            text += "\n" + json.dumps(shown, ensure_ascii=False)
    return result.exit_code, text


def message_line(case: Case, text: str) -> str:
    """The line of ``text`` that carries the case's first expected fragment (for the table)."""
    for line in text.splitlines():
        if case.expect[0] in line:
            line = line.strip()
            if line.startswith("{"):  # a predictions row: an error's message, else the row
                line = json.loads(line).get("error") or line
            return line
    return text.strip().splitlines()[-1] if text.strip() else ""


__all__ = ["CASES", "ROWS", "Case", "Env", "build_env", "message_line", "run_case"]
