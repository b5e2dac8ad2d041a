"""Prompt templates (``prompts/<name>.txt``) and prompt building as *segments*.

A template file holds one *block*: a demonstration is the block filled in, the query is the block
cut right before ``{entity}``. Placeholders: ``{text}``, ``{mention}``, ``{entity}`` (required, once)
and ``{image}`` (where a mention's visual tokens go). Lines starting with ``## `` are comments;
``#! key: value`` lines are directives (``format: chat`` wraps the blocks in the tokenizer's chat
template: a demonstration becomes a user turn and an assistant turn).

A template may hold one block per *kind of mention*, each after a ``#! form: KIND`` line:

* ``text`` — the mention is named by its mention string;
* ``box``  — only a visual prompt (bbox / polygon) marks it: this block must not use ``{mention}``;
* ``both`` — a mention string and a region, linked with images.

Every block of a mention — the query's and each demonstration's — is chosen by that mention's own
kind (:func:`mention_kind`), in training, in demonstrations and at link time alike. The forms must
end the answer the same way (one trie serves them all). A template without ``form`` lines has one
block for every kind; a block that names ``{mention}`` never serves a mention without one.

A built prompt is a list of segments — ``str`` for text, :class:`ImageSlot` for a mention's image —
so that the model can embed text through the LLM's embedding table and images through the mapper.
Adding a template: docs/architecture.md ("Where to add").
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from gemel.errors import DataError, GemelError
from gemel.types import Mention

PLACEHOLDERS = {"text", "mention", "entity", "image"}
DIRECTIVES = {"format", "form"}
KINDS = ("text", "box", "both")
# the block a mention of each kind takes when the template has no block of that kind
_FALLBACK = {"text": ("text",), "box": ("box",), "both": ("both", "text", "box")}
_IMAGE_MARK = "\x00IMG{}\x00"  # sentinel used while rendering a chat template around image slots


@dataclass(frozen=True)
class ImageSlot:
    """Where one mention's visual tokens go. ``mention`` carries the image path and visual prompt."""

    mention: Mention


Segment = "str | ImageSlot"


@dataclass
class Prompt:
    """A prompt ready to embed: segments, and the demonstrations that survived the token budget."""

    segments: list  # list[str | ImageSlot]
    demonstrations: list = field(default_factory=list)  # list[Mention], in prompt order


def mention_kind(m: Mention, use_images: bool) -> str:
    """``text`` (a mention string), ``box`` (only a bbox / polygon marks it) or ``both`` (a
    mention string and a region, linked with images: without them the region is not seen)."""
    named = bool(m.mention and m.mention.strip())
    region = m.bbox is not None or m.polygon is not None
    if named:
        return "both" if region and use_images and m.image else "text"
    return "box" if region else "text"


@dataclass(frozen=True)
class Template:
    name: str
    block: str  # text with placeholders (the text form when the template has several)
    chat: bool = False
    source: str = ""
    forms: dict = field(default_factory=dict)  # kind -> block; empty: ``block`` serves every kind

    def block_for(self, m: Mention, use_images: bool) -> str:
        """The block of ``m``'s kind; raises DataError when the template has none that fits."""
        kind = mention_kind(m, use_images)
        if not self.forms:
            block = self.block
        else:
            block = next((self.forms[k] for k in _FALLBACK[kind] if k in self.forms), None)
            if block is None:
                raise DataError(f"template {self.name!r} has no block for a {kind!r} mention "
                                f"(it has {sorted(self.forms)})", record=m.id, field="mention",
                                fix=f"add a '#! form: {kind}' block to {self.source or self.name}")
        if "{mention}" in block and not (m.mention and m.mention.strip()):
            raise DataError(f"mention has no mention string, and template {self.name!r} asks "
                            f"'{{mention}}' in its {kind!r} block", record=m.id, field="mention",
                            fix="give the mention a bbox or polygon and use a template with a "
                                "'#! form: box' block (gemel, gemel_chat, gemel_vp), or give its "
                                "mention string")
        return block

    @property
    def question(self) -> str:
        """The block up to the line holding {entity} (the user turn in chat format)."""
        return _question(self.block)

    @property
    def answer_prefix(self) -> str:
        """The text right before {entity} on its line, e.g. ``[Answer]`` (the trie tokenizes after it)."""
        head = self.block.split("{entity}")[0]
        return head[head.rfind("\n") + 1:]

    @property
    def after_answer(self) -> str:
        """What the template puts right after the answer (for plain templates, the terminator text)."""
        return self.block.split("{entity}")[1]


def _question(block: str) -> str:
    head = block.split("{entity}")[0]
    return head[: head.rfind("\n") + 1] if "\n" in head else ""


def template_names() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files("gemel.prompts").iterdir()
                  if p.name.endswith(".txt"))


def load_template(name_or_path: str) -> Template:
    """Load ``prompts/<name>.txt`` (shipped) or a template file by path, and check its placeholders."""
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.exists():
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        shipped = resources.files("gemel.prompts") / f"{name_or_path}.txt"
        if not shipped.is_file():
            raise GemelError(f"unknown template {name_or_path!r}: shipped templates are "
                             f"{template_names()}; or give the path of a .txt file")
        text, source = shipped.read_text(encoding="utf-8"), f"prompts/{name_or_path}.txt"
    return parse_template(text, name=path.stem, source=source)


def parse_template(text: str, name: str = "custom", source: str = "<string>") -> Template:
    directives: dict[str, str] = {}
    body: list[str] = []
    forms: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if line.startswith("## ") or line.strip() == "##":
            continue
        if line.startswith("#!"):
            key, _, value = line[2:].partition(":")
            key, value = key.strip(), value.strip()
            if key not in DIRECTIVES:
                raise DataError(f"unknown directive {key!r}; known: {sorted(DIRECTIVES)}",
                                path=source, record=f"line {lineno}", field="directive")
            if key == "form":
                if value not in KINDS or value in forms:
                    raise DataError(f"form {value!r} is unknown or given twice; forms are "
                                    f"{', '.join(KINDS)}, each once", path=source,
                                    record=f"line {lineno}", field="form")
                if not forms and "".join(body).strip():
                    raise DataError("text before the first '#! form:' line belongs to no form",
                                    path=source, record=f"line {lineno}", field="form")
                body = forms[value] = []
                continue
            directives[key] = value
            continue
        body.append(line)
    fmt = directives.get("format", "plain")
    if fmt not in ("plain", "chat"):
        raise DataError(f"format must be plain or chat, not {fmt!r}", path=source, field="format")
    if not forms:
        return Template(name=name, block=_check_block("".join(body), source), chat=fmt == "chat",
                        source=source)
    blocks = {k: _check_block("".join(v), source, k) for k, v in forms.items()}
    first = next(iter(blocks.values()))
    for kind, block in blocks.items():
        for part, cut in (("answer prefix", lambda b: b.split("{entity}")[0].rsplit("\n", 1)[-1]),
                          ("text after the answer", lambda b: b.split("{entity}")[1])):
            if cut(block) != cut(first):
                raise DataError(f"form {kind!r} has another {part} ({cut(block)!r}) than the "
                                f"first form ({cut(first)!r}); one trie serves every form",
                                path=source, field="form")
    if "box" in blocks and "{mention}" in blocks["box"]:
        raise DataError("the 'box' form is for mentions without a mention string: it cannot use "
                        "{mention}", path=source, field="form")
    main = blocks.get("text", first)
    return Template(name=name, block=main, chat=fmt == "chat", source=source, forms=blocks)


def _check_block(block: str, source: str, form: str | None = None) -> str:
    """Check one block's placeholders; return it."""
    where = {"record": f"form {form}"} if form else {}
    found = [f for _, f, _, _ in string.Formatter().parse(block) if f is not None]
    unknown = sorted(set(found) - PLACEHOLDERS)
    if unknown:
        raise DataError(f"unknown placeholder(s) {unknown}; allowed: {sorted(PLACEHOLDERS)}",
                        path=source, field="placeholder", fix="escape literal braces as {{ }}",
                        **where)
    if found.count("entity") != 1:
        raise DataError("the template must contain {entity} exactly once (where the answer goes)",
                        path=source, field="placeholder", **where)
    if "text" not in found and "image" not in found:
        raise DataError("the template needs {text} or {image}: the query would carry no context",
                        path=source, field="placeholder", **where)
    if found.index("entity") != len(found) - 1:
        raise DataError("{entity} must be the last placeholder: the query is cut right before it",
                        path=source, field="placeholder", **where)
    return block


class PromptBuilder:
    """Fills a template with demonstrations and a query, as segments.

    ``tokenizer`` is needed for chat templates and for the token budget (``max_tokens``):
    when the prompt is too long, the least similar demonstrations (the first ones, since
    demonstrations arrive least similar first) are dropped; the query is never dropped.
    ``image_tokens`` is the number of soft tokens one image slot costs (0 for text-only models).
    """

    def __init__(self, template: Template | str, tokenizer=None, *, use_images: bool = False,
                 image_tokens: int = 0, max_tokens: int | None = None):
        self.template = load_template(template) if isinstance(template, str) else template
        self.tokenizer = tokenizer
        self.use_images = use_images and any(
            "{image}" in b for b in (self.template.forms or {"": self.template.block}).values())
        self.image_tokens = image_tokens
        self.max_tokens = max_tokens
        if self.template.chat and tokenizer is None:
            raise GemelError(f"template {self.template.name!r} is a chat template: "
                             "PromptBuilder needs the tokenizer")
        if self.template.chat and not getattr(tokenizer, "chat_template", None):
            raise GemelError(f"template {self.template.name!r} needs a tokenizer with a chat "
                             "template; this tokenizer has none: use the plain 'gemel' template")

    # -- text of one block -------------------------------------------------------------------
    def _fill(self, m: Mention, part: str, images: list, entity: str | None = None) -> str:
        has_image = self.use_images and m.image is not None
        if has_image:
            images.append(ImageSlot(m))
        values = {"text": m.text, "mention": m.mention or "",
                  "image": _IMAGE_MARK.format(len(images) - 1) if has_image else "",
                  "entity": entity if entity is not None else ""}
        return part.format(**values)

    @property
    def answer_prefix(self) -> str:
        return self.template.answer_prefix

    @property
    def terminator_text(self) -> str:
        """The text that ends an answer: the trie's terminator is its first token."""
        if not self.template.chat:
            return self.template.after_answer or "\n"
        sentinel = "\x01ANSWER\x01"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}],
            tokenize=False)
        return rendered.split(sentinel, 1)[1] or (self.tokenizer.eos_token or "\n")

    def block_for(self, m: Mention) -> str:
        """The template block ``m`` is rendered with (by its own kind of mention)."""
        return self.template.block_for(m, self.use_images)

    def _render(self, query: Mention, demos: Sequence[Mention]) -> tuple[str, list]:
        t, images = self.template, []
        if not t.chat:
            parts = [self._fill(d, self.block_for(d), images, d.entity or "") for d in demos]
            head = self.block_for(query).split("{entity}")[0]
            parts.append(self._fill(query, head, images))
            return "".join(parts), images
        messages = []
        for d in demos:
            messages.append({"role": "user",
                             "content": self._fill(d, _question(self.block_for(d)), images).rstrip("\n")})
            messages.append({"role": "assistant",
                             "content": self._fill(d, t.answer_prefix + "{entity}", images,
                                                   d.entity or "")})
        messages.append({"role": "user", "content": self._fill(
            query, _question(self.block_for(query)), images).rstrip("\n")})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self._fill(query, t.answer_prefix, images), images

    def _segments(self, text: str, images: list) -> list:
        segments: list = []
        for piece in re.split("(\x00IMG\\d+\x00)", text):
            if piece.startswith("\x00IMG"):
                segments.append(images[int(piece[4:-1])])
            elif piece:
                segments.append(piece)
        return segments

    def n_tokens(self, prompt: Prompt) -> int:
        n = 0
        for s in prompt.segments:
            n += self.image_tokens if isinstance(s, ImageSlot) else len(
                self.tokenizer(s, add_special_tokens=False)["input_ids"])
        return n + 1  # a BOS token, where the tokenizer adds one

    def build(self, query: Mention, demonstrations: Sequence[Mention] = ()) -> Prompt:
        """Demonstrations come least similar first; the most similar sits right before the query."""
        demos = list(demonstrations)
        while True:
            text, images = self._render(query, demos)
            prompt = Prompt(self._segments(text, images), demos)
            if self.max_tokens is None or self.tokenizer is None or not demos:
                return prompt
            if self.n_tokens(prompt) <= self.max_tokens:
                return prompt
            demos = demos[1:]  # drop the least similar demonstration first
