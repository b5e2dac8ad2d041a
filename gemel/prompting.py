"""Prompt templates (``prompts/<name>.txt``) and prompt building as *segments*.

A template file holds one *block*: a demonstration is the block filled in, the query is the block
cut right before ``{entity}``. Placeholders: ``{text}``, ``{mention}``, ``{entity}`` (required, once)
and ``{image}`` (where a mention's visual tokens go). Lines starting with ``## `` are comments;
``#! key: value`` lines are directives (``format: chat`` wraps the blocks in the tokenizer's chat
template: a demonstration becomes a user turn and an assistant turn).

A built prompt is a list of segments — ``str`` for text, :class:`ImageSlot` for a mention's image —
so that the model can embed text through the LLM's embedding table and images through the mapper.
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
DIRECTIVES = {"format"}
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


@dataclass(frozen=True)
class Template:
    name: str
    block: str  # text with placeholders
    chat: bool = False
    source: str = ""

    @property
    def question(self) -> str:
        """The block up to the line holding {entity} (the user turn in chat format)."""
        head = self.block.split("{entity}")[0]
        return head[: head.rfind("\n") + 1] if "\n" in head else ""

    @property
    def answer_prefix(self) -> str:
        """The text right before {entity} on its line, e.g. ``[Answer]`` (the trie tokenizes after it)."""
        head = self.block.split("{entity}")[0]
        return head[head.rfind("\n") + 1:]

    @property
    def after_answer(self) -> str:
        """What the template puts right after the answer (for plain templates, the terminator text)."""
        return self.block.split("{entity}")[1]


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
    body = []
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if line.startswith("## ") or line.strip() == "##":
            continue
        if line.startswith("#!"):
            key, _, value = line[2:].partition(":")
            key = key.strip()
            if key not in DIRECTIVES:
                raise DataError(f"unknown directive {key!r}; known: {sorted(DIRECTIVES)}",
                                path=source, record=f"line {lineno}", field="directive")
            directives[key] = value.strip()
            continue
        body.append(line)
    block = "".join(body)
    found = [f for _, f, _, _ in string.Formatter().parse(block) if f is not None]
    unknown = sorted(set(found) - PLACEHOLDERS)
    if unknown:
        raise DataError(f"unknown placeholder(s) {unknown}; allowed: {sorted(PLACEHOLDERS)}",
                        path=source, field="placeholder", fix="escape literal braces as {{ }}")
    if found.count("entity") != 1:
        raise DataError("the template must contain {entity} exactly once (where the answer goes)",
                        path=source, field="placeholder")
    if "text" not in found and "image" not in found:
        raise DataError("the template needs {text} or {image}: the query would carry no context",
                        path=source, field="placeholder")
    if found.index("entity") != len(found) - 1:
        raise DataError("{entity} must be the last placeholder: the query is cut right before it",
                        path=source, field="placeholder")
    fmt = directives.get("format", "plain")
    if fmt not in ("plain", "chat"):
        raise DataError(f"format must be plain or chat, not {fmt!r}", path=source, field="format")
    return Template(name=name, block=block, chat=fmt == "chat", source=source)


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
        self.use_images = use_images and "{image}" in self.template.block
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

    def _render(self, query: Mention, demos: Sequence[Mention]) -> tuple[str, list]:
        t, images = self.template, []
        if not t.chat:
            parts = [self._fill(d, t.block, images, d.entity or "") for d in demos]
            head = t.block.split("{entity}")[0]
            parts.append(self._fill(query, head, images))
            return "".join(parts), images
        messages = []
        for d in demos:
            messages.append({"role": "user", "content": self._fill(d, t.question, images).rstrip("\n")})
            messages.append({"role": "assistant",
                             "content": self._fill(d, t.answer_prefix + "{entity}", images,
                                                   d.entity or "")})
        messages.append({"role": "user", "content": self._fill(query, t.question, images).rstrip("\n")})
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
