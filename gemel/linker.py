"""Linker: the one obvious entry point.

    from gemel import Linker
    from gemel.kb import KnowledgeBase
    linker = Linker.from_config(kb=KnowledgeBase.from_jsonl("kb.jsonl"), model="smollm2-135m-instruct")
    results = linker.link(mentions, top_k=5)     # -> list[LinkResult]

A batch passes each module once, going down: demonstrations, prompts, embeddings, one candidate
retrieval, one backend call (the search, and the pool's titles scored under the same prefill),
then the rerank stage (docs/architecture.md, "One mention, from gemel link to its prediction
row"; tests/test_link_trace.py holds it).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gemel.backends.base import Backend, get_backend
from gemel.config import DTYPES, check_values, from_dict, load_yaml
from gemel.data.nil import NIL, answer_ids, is_nil
from gemel.errors import DataError, GemelError
from gemel.prior import MentionPrior, known_titles
from gemel.rerank import SIMILARITY_FIELDS, FusionModel, candidate_pools
from gemel.retrieval import get_retriever, order_demonstrations
from gemel.kb import KnowledgeBase
from gemel.model import GemelModel
from gemel.prompting import PromptBuilder, load_template
from gemel.sources import default_template
from gemel.trie import EntityTrie
from gemel.trie_store import load_or_build_trie
from gemel.types import Candidate, LinkResult, Mention

log = logging.getLogger(__name__)


@dataclass
class LinkerConfig:
    model: str = "smollm2-135m-instruct"
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    template: str | None = None  # None: the mapper checkpoint's, else the model's default
    #                                (gemel/offline_models.yaml), else gemel
    num_beams: int = 5
    top_k: int = 5
    max_new_tokens: int = 32
    length_penalty: float = 0.0  # 0: raw sequence log-probability
    batch_size: int = 4
    terminator: str | None = None  # None: what the template puts after the answer
    trie: str | None = None  # a saved trie folder; None: built once and cached per KB + tokenizer
    max_prompt_tokens: int | None = None
    # in-context demonstrations (needs training mentions)
    demos: int = 0
    # simcse | bm25 | random | hybrid | image. "simcse" names the method (nearest training mentions
    # by sentence-embedding cosine, as GEMEL retrieves): the model is sentence_model, by default
    # MiniLM (all-MiniLM-L6-v2, offline), not a SimCSE checkpoint
    retriever: str = "simcse"
    demo_order: str = "ascending"  # GEMEL: least similar first, most similar right before the query
    seed: int = 0
    # candidate-restricted decoding: restrict the trie per mention to the top-C retrieved KB
    # titles (CLI: --candidates C; YAML: num_candidates, or the old key candidates)
    num_candidates: int = 0
    sentence_model: str = "minilm-l6-v2"  # for simcse demonstrations and the candidate retriever
    # score fusion: a fitted FusionModel JSON (gemel fit-fusion)
    fusion: str | None = None
    fusion_pool: int = 16  # top retrieved titles added to the beams, prior and exact matches
    # images: a mapper checkpoint from `gemel train` (names its vision encoder, feature, template)
    mapper: str | None = None
    no_image: bool = False  # ablation: the same mapper run, but every prompt text-only
    feature_cache: str | None = "auto"  # vision features on disk: auto = <gemel cache>/features,
    #                                     a folder, or None / "none" (in memory only)
    # NIL: a reserved answer "NIL" (entity_id null) for mentions whose entity is not in the KB;
    # NIL training mentions then serve as demonstrations (otherwise they are left out)
    nil: bool = False

    def __post_init__(self) -> None:
        check_values(self, minimum={"num_beams": 1, "top_k": 1, "batch_size": 1,
                                    "max_new_tokens": 1, "max_prompt_tokens": 1, "demos": 0,
                                    "num_candidates": 0, "fusion_pool": 1, "length_penalty": 0.0},
                     choices={"dtype": DTYPES})
        check_top_k(self.top_k, self.num_beams, self.fusion)


# LinkerConfig keys renamed since configs were first written: old key -> new key. The old one is
# still read (with a warning); gemel.runs keeps the old name in a run's identity, so runs written
# before the rename resume.
RENAMED = {"candidates": "num_candidates"}


def check_top_k(top_k: int, num_beams: int, fusion: str | None) -> None:
    """H@k is only honest when k candidates can exist: beam search finishes at most about
    ``num_beams`` titles (a few more that ended early), so ``top_k > num_beams`` is refused unless
    a fusion model ranks a wider pool."""
    if fusion is None and top_k > num_beams:
        raise DataError(f"top_k={top_k} is more than num_beams={num_beams}: beam search returns "
                        f"about {num_beams} candidates, so H@{top_k} would be mislabelled",
                        field="top_k", fix=f"give --top-k {num_beams} or less, or --beams "
                        f"{top_k} or more")


def linker_config(config: "LinkerConfig | dict | str | Path | None" = None, *,
                  source: str = "<config>", **overrides) -> "LinkerConfig":
    """A checked LinkerConfig from a LinkerConfig, a dict or a YAML file, with ``overrides`` (the
    non-None ones) winning. Where no top_k is given at all, top_k is min(5, num_beams): a
    ``--beams 3`` run reports H@3, never an H@5 over 3 candidates."""
    if config is None:
        values: dict = {}
    elif isinstance(config, LinkerConfig):
        values = dataclasses.asdict(config)
    elif isinstance(config, (str, Path)):
        values, source = load_yaml(config), str(config)
    elif isinstance(config, dict):
        values = dict(config)
    else:
        raise GemelError(f"a Linker config is a LinkerConfig, a dict or a YAML path, not "
                         f"{type(config).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    _rename_old_keys(values, source)
    beams = values.get("num_beams", LinkerConfig.num_beams)
    if ("top_k" not in values and values.get("fusion") is None and isinstance(beams, int)
            and not isinstance(beams, bool) and beams >= 1):
        values["top_k"] = min(LinkerConfig.top_k, beams)
    return from_dict(LinkerConfig, values, source=source)


def _rename_old_keys(values: dict, source: str) -> None:
    """Read the old names of renamed keys (:data:`RENAMED`) under their new ones, with a warning."""
    for old, new in RENAMED.items():
        if old not in values:
            continue
        if new in values:
            raise DataError(f"both {old!r} and {new!r} are given; {old!r} is the old name of "
                            f"{new!r}", path=source, field=old, fix=f"keep only {new!r}")
        warnings.warn(f"{source}: config key {old!r} is now called {new!r}; rename it (the old "
                      "name is still read)", FutureWarning, stacklevel=3)
        values[new] = values.pop(old)


class Linker:
    def __init__(self, config: LinkerConfig, kb: KnowledgeBase, backend: Backend,
                 trie: EntityTrie | None = None, model: GemelModel | None = None,
                 train: Sequence[Mention] | None = None, retriever=None, candidate_retriever=None):
        self.config, self.kb, self.backend = config, kb, backend
        # seconds spent on demonstrations, prompts, candidate retrieval and the beam search (the
        # rest of a fused link_batch is the pool's scoring and features): benchmarks report pure
        # generation's share of a fused run
        self.seconds = {"generate": 0.0}
        # title index -> title; in NIL mode one more index, past the KB's, is the NIL answer
        self.titles = list(kb.titles) + ([NIL] if config.nil else [])
        self.nil_index = len(kb.titles) if config.nil else None
        if config.nil and NIL in kb.titles:
            raise GemelError(f"--nil reserves the answer {NIL!r}, but the KB has an entity titled "
                             f"{NIL!r} ({kb.ids_for_title_index(kb.titles.index(NIL))[0]}); rename "
                             "it in the KB or link without --nil")
        train = demonstration_pool(train, config.nil)
        self.retriever = retriever
        if config.demos > 0 and retriever is None:
            if not train:
                raise GemelError(f"demos={config.demos} needs training mentions to retrieve "
                                 "demonstrations from (--train FILE)")
            self.retriever = fit_retriever(config, train)
        self.fusion = FusionModel.load(config.fusion) if config.fusion else None
        # keep every mention's candidate pool (titles, ids, fusion features) in its row: set by
        # gemel.fusion.fit_on_mentions; always on with a fusion model, so a refit can rerank a run
        self.keep_pool = self.fusion is not None
        self.prior = MentionPrior(train or [])
        if self.fusion is not None and not train:
            raise GemelError("score fusion needs the training mentions (--train FILE) for its prior")
        self.candidate_retriever = candidate_retriever  # None until needed: see its getter
        if config.num_candidates > 0 or self.fusion is not None:
            self.get_candidate_retriever()  # built now, not mid-run
        tokenizer = backend.tokenizer
        self.context = backend.max_context  # prompt + answer tokens the model takes (None: unknown)
        image_embedder = None
        checkpoint = None
        if model is None and config.mapper:
            # the checkpoint is the one source of truth: its LoRA adapters, template, vision
            # encoder and visual-prompt mode are the ones it was trained with
            checkpoint = apply_checkpoint(config.mapper, backend, config.model)
            if not config.no_image:
                image_embedder = load_image_embedder(checkpoint, backend, config.feature_cache,
                                                     model_name=config.model)
        elif model is not None:
            image_embedder = model.image_embedder
        tokens_per_slot = getattr(image_embedder, "tokens_per_slot", 0)
        self.checkpoint = checkpoint
        template = choose_template(config.template, checkpoint, config.model)
        if config.template is None:  # recorded, so that a run's config names the template it used
            self.config = config = dataclasses.replace(config, template=template.name)
        self.builder = PromptBuilder(template, tokenizer,
                                     use_images=image_embedder is not None,
                                     image_tokens=tokens_per_slot,
                                     max_tokens=config.max_prompt_tokens)
        self.model = model or GemelModel(tokenizer, backend.input_embeddings(), image_embedder)
        # box-only mentions (no mention string) linked from their text alone under --no-image
        self.box_only_from_text = 0
        self.trie = trie or load_or_build_trie(kb, tokenizer, self.builder.answer_prefix,
                                               config.terminator or self.builder.terminator_text,
                                               path=config.trie, nil=config.nil)

    @classmethod
    def from_config(cls, config: LinkerConfig | dict | str | Path | None = None, *,
                    kb: KnowledgeBase | str | Path, train: Sequence[Mention] | None = None,
                    **overrides) -> "Linker":
        """``config``: a LinkerConfig, a dict, or a YAML file; ``overrides`` win over it."""
        config = linker_config(config, **overrides)
        if not isinstance(kb, KnowledgeBase):
            kb = KnowledgeBase.from_jsonl(kb)
        backend = get_backend(config.backend, config.model, device=config.device, dtype=config.dtype)
        return cls(config, kb, backend, train=train)

    # -- linking ---------------------------------------------------------------------------------
    def link(self, mentions: Iterable[Mention], top_k: int | None = None) -> list[LinkResult]:
        mentions = list(mentions)
        bs = self.config.batch_size
        if len(mentions) <= bs:
            return self.link_batch(mentions, top_k=top_k)
        # Batch prompts of similar length (a batch is left-padded to its longest prompt), one
        # demonstration retrieval for the run; results come back in input order.
        demos = self.demonstrations(mentions)
        size = [len(m.text or "") + sum(len(d.text or "") for d in ds)
                for m, ds in zip(mentions, demos)]  # characters: a cheap stand-in for tokens
        order = sorted(range(len(mentions)), key=size.__getitem__)
        out: list[LinkResult | None] = [None] * len(mentions)
        for i in range(0, len(order), bs):
            batch = order[i:i + bs]
            results = self.link_batch([mentions[j] for j in batch], top_k=top_k,
                                      demonstrations=[demos[j] for j in batch])
            for j, r in zip(batch, results):
                out[j] = r
        return out

    def unlinkable(self, m: Mention) -> str | None:
        """Why this linker cannot link ``m`` (None: it can). A mention without a mention string is
        marked by its box or polygon only: it needs the image model, never a text-only guess —
        unless the run is the deliberate ``--no-image`` ablation of a mapper."""
        if m.mention and m.mention.strip():
            return None
        if self.model.image_embedder is not None:
            if not m.image:
                return ("the mention has no mention string and no image: nothing marks it; give "
                        "it its image (with a bbox or polygon) or its mention string")
            return None
        if self.config.mapper and self.config.no_image:
            return None
        return ("the mention has no mention string (only a box or polygon marks it): linking it "
                "needs an image model; pass --mapper CKPT (a mapper from `gemel train --vp-mode "
                "overlay`), or --mapper CKPT --no-image to link it from its text on purpose")

    def link_batch(self, mentions: Sequence[Mention], top_k: int | None = None,
                   demonstrations: Sequence[Sequence[Mention]] | None = None) -> list[LinkResult]:
        """Link one batch (one prefill). ``demonstrations[i]`` are mention i's, least similar first.

        A mention this linker cannot link (:meth:`unlinkable`) gets a result with ``error`` set."""
        why = [self.unlinkable(m) for m in mentions]
        if any(why):
            keep = [i for i, w in enumerate(why) if w is None]
            done = iter(self.link_batch([mentions[i] for i in keep], top_k,
                                        [demonstrations[i] for i in keep]
                                        if demonstrations is not None else None) if keep else [])
            return [next(done) if w is None else
                    LinkResult(m.id, (), gold_id=m.entity_id, error=f"DataError: {w}")
                    for m, w in zip(mentions, why)]
        if self.model.image_embedder is None:
            self.box_only_from_text += sum(not (m.mention and m.mention.strip()) for m in mentions)
        k = top_k or self.config.top_k
        check_top_k(k, self.config.num_beams, self.config.fusion)
        t0 = time.perf_counter()
        searched, retrieved, known, extras = self.generate(mentions, k, demonstrations)
        self.seconds["generate"] += time.perf_counter() - t0 - searched.score_seconds
        if self.config.nil:
            for m, x in zip(mentions, extras):
                if is_nil(m):
                    x["gold_nil"] = True  # metrics count it: a hit is the NIL answer
        hyps = searched.hypotheses
        if self.keep_pool:
            hyps = self.rerank(mentions, searched, known, retrieved, extras, k)
        return [LinkResult(m.id, self.candidate_list(h, k), gold_id=m.entity_id, extra=x)
                for m, h, x in zip(mentions, hyps, extras)]

    def generate(self, mentions: Sequence[Mention], k: int,
                 demonstrations: Sequence[Sequence[Mention]] | None = None):
        """Prompts, then the candidate retriever's one call (the sub-tries' titles and the pool's
        nearest), then the backend's one call: the constrained beam search and, when pools are
        kept, the log-probabilities of each pool's titles known without the LLM
        (:func:`gemel.prior.known_titles`) under the same prefill.

        Returns (:class:`gemel.beam.Searched`, the batch's :class:`gemel.candidates.Retrieved`
        or None, the known titles per mention or None, extras per mention)."""
        if demonstrations is None:
            demonstrations = self.demonstrations(mentions)
        prompts = [self.builder.build(m, d) for m, d in zip(mentions, demonstrations)]
        embeds, mask = self.model.embed(prompts)
        self.check_context(mentions, mask)
        retrieved = self.retrieve(mentions)
        tries, extras = self.restricted_tries(mentions, retrieved)
        known = None
        if self.keep_pool:
            known = [known_titles(self.kb, self.prior, m, r[:self.config.fusion_pool],
                                  self.nil_index) for m, r in zip(mentions, retrieved.titles)]
        searched = self.backend.run(embeds, mask, tries, num_beams=max(self.config.num_beams, 1),
                                    top_k=k, max_new_tokens=self.config.max_new_tokens,
                                    length_penalty=self.config.length_penalty, titles=known,
                                    title_trie=self.trie)
        return searched, retrieved, known, extras

    def retrieve(self, mentions: Sequence[Mention]):
        """The candidate retriever's one call for a batch: as many titles as the sub-tries
        (``num_candidates``) and the pools (``fusion_pool``) take, with the query fields the
        pools' similarity features read; None when neither is on."""
        c = max(self.config.num_candidates, self.config.fusion_pool if self.keep_pool else 0)
        if c == 0:
            return None
        fields = SIMILARITY_FIELDS if self.keep_pool else ()
        return self.get_candidate_retriever().retrieve(mentions, c, fields)

    def restricted_tries(self, mentions: Sequence[Mention], retrieved) -> tuple[object, list[dict]]:
        """The trie to search for each mention (the whole one, or with ``--candidates C`` a
        sub-trie of its top-C retrieved titles), and extras per mention ("in_candidates": the
        gold entity among them)."""
        extras = [{} for _ in mentions]
        if self.config.num_candidates <= 0:
            return self.trie, extras
        rows = retrieved.titles[:, :self.config.num_candidates]
        nil = [self.nil_index] if self.config.nil else []  # NIL stays a possible answer
        for extra, m, r in zip(extras, mentions, rows):
            if m.entity_id is not None:
                retrieved_ids = {e for i in r.tolist() for e in self.kb.ids_for_title_index(i)}
                extra["in_candidates"] = m.entity_id in retrieved_ids
        return [self.trie.subtrie(r.tolist() + nil) for r in rows], extras

    def check_context(self, mentions: Sequence[Mention], mask) -> None:
        """DataError naming the first mention whose prompt (``mask`` [n, seq], 1 = token) plus
        the longest answer does not fit the model's context (a batch failing here is retried
        mention by mention, so only the long one becomes an error row)."""
        context = self.context
        if context is None:
            return
        for m, n in zip(mentions, mask.sum(-1).tolist()):
            if n + self.config.max_new_tokens > context:
                raise DataError(f"the prompt takes {n} tokens and the answer up to "
                                f"{self.config.max_new_tokens} more: over the model's context "
                                f"of {context} tokens", record=m.id, field="text",
                                fix="shorten the text, use fewer --demos, or set "
                                "--max-prompt-tokens")

    def long_titles(self) -> list[str]:
        """KB titles whose tokens (terminator included) exceed ``max_new_tokens``: the search
        stops before they end, so they can never be generated."""
        too_long = np.flatnonzero(self.trie.lengths() > self.config.max_new_tokens)
        return [self.titles[i] for i in too_long.tolist()]

    def rerank(self, mentions: Sequence[Mention], searched, known: list[list[int]], retrieved,
               extras: list[dict], k: int) -> list:
        """The rerank stage (:mod:`gemel.rerank`): each mention's candidate pool, kept in its
        extras under "pool" (titles, ids, features). With a fusion model, returns the pools ranked
        by it (generation's own top k kept under "generated"); without, the beams unchanged."""
        pools = candidate_pools(mentions, searched.hypotheses, known, searched.logprobs,
                                retrieved, kb=self.kb, prior=self.prior,
                                size=self.config.fusion_pool, nil_index=self.nil_index)
        for x, pool in zip(extras, pools):
            x["pool"] = pool.to_json(self.titles)
        if self.fusion is None:
            return searched.hypotheses
        ranked = [pool.ranked(self.fusion) for pool in pools]
        for x, h in zip(extras, searched.hypotheses):
            x["generated"] = [c.entity_id for c in self.candidate_list(h, k)]
        return ranked

    def get_candidate_retriever(self):
        """The KB-title retriever (:class:`gemel.candidates.CandidateRetriever` over
        ``config.sentence_model``) of candidate-restricted decoding and of the rerank stage:
        built on first use, then kept in ``self.candidate_retriever``."""
        if self.candidate_retriever is None:
            from gemel.candidates import CandidateRetriever

            self.candidate_retriever = CandidateRetriever(self.kb, self.config.sentence_model)
        return self.candidate_retriever


    def demonstrations(self, mentions: Sequence[Mention]) -> list[list[Mention]]:
        """Per mention, its retrieved demonstrations in prompt order (none without a retriever)."""
        if self.retriever is None or self.config.demos <= 0:
            return [[] for _ in mentions]
        found = self.retriever.query_batch(mentions, self.config.demos)
        return [[d.mention for d in order_demonstrations(ds, self.config.demo_order)]
                for ds in found]

    def ids_for(self, title_index: int) -> list[str | None]:
        """The entity ids behind a title index; ``[None]`` for the NIL answer."""
        return answer_ids(self.kb, title_index, self.nil_index)

    def candidate_list(self, hypotheses, k: int) -> tuple[Candidate, ...]:
        """Hypotheses (title indices) -> up to k entities; entities sharing a title share its score."""
        out: list[Candidate] = []
        for h in hypotheses:
            title = self.titles[h.title_index]
            for entity_id in self.ids_for(h.title_index):
                out.append(Candidate(entity_id, title, round(h.score, 6)))
        return tuple(out[:k])


def load_image_embedder(mapper_dir: str | Path, backend: Backend, feature_cache: str | None = "auto",
                        model_name: str | None = None):
    """Vision encoder + trained mapper from a `gemel train` checkpoint, checked against the LLM.
    ``feature_cache``: "auto" (<gemel cache>/features), a folder, or None / "none"."""
    from gemel.feature_cache import open_feature_cache
    from gemel.image_tokens import ImageTokens
    from gemel.mapper import LinearMapper, llm_identity
    from gemel.vision import VisionEncoder

    saved = LinearMapper.read_config(mapper_dir)
    vision = VisionEncoder.from_name(saved["vision"]["model"], feature=saved["feature"],
                                     device=backend.device,
                                     layout=saved.get("layout", "global"))
    # the LLM under the name the user gave (an offline name resolves to a cache folder, which
    # is no reason to warn about a renamed model)
    mapper = LinearMapper.load(mapper_dir, expect_llm=llm_identity(backend.model, name=model_name),
                               out_dtype=backend.dtype, expect_vision=vision,
                               device=backend.device)
    return ImageTokens(vision, mapper, saved.get("vp_mode", "none"),
                       cache=open_feature_cache(feature_cache))


def apply_checkpoint(mapper: str | Path, backend: Backend, model_name: str | None = None) -> Path:
    """Resolve a ``--mapper`` folder to its checkpoint, check it was trained for this LLM, and
    merge its LoRA adapters (if any) into the backend's LLM. Returns the checkpoint folder."""
    from gemel.mapper import (LinearMapper, attach_lora, check_llm, has_lora, llm_identity,
                              resolve_checkpoint)

    checkpoint = resolve_checkpoint(mapper)
    saved = LinearMapper.read_config(checkpoint)
    check_llm(saved.get("llm") or {}, llm_identity(backend.model, name=model_name),
              source=checkpoint)
    if has_lora(checkpoint):
        # merged once, so linking runs at the plain model's speed (adapters touch no embedding)
        backend.model = attach_lora(backend.model, checkpoint).merge_and_unload().eval()
        log.info("applied the LoRA adapters of %s", checkpoint)
    return checkpoint


def choose_template(requested: str | None, checkpoint: Path | None, model: str):
    """The prompt template, by precedence: a mapper checkpoint's (a different ``requested`` one
    is an error naming both), else ``requested``, else the model's default, else ``gemel``."""
    from gemel.mapper import LinearMapper, checkpoint_template

    trained = (checkpoint_template(checkpoint, LinearMapper.read_config(checkpoint))
               if checkpoint is not None else None)
    if trained is None:
        return load_template(requested or default_template(model))
    asked = load_template(requested) if requested is not None else None
    if asked is not None and (asked.block, asked.chat) != (trained.block, trained.chat):
        raise GemelError(f"--template {requested!r} differs from template {trained.name!r} that "
                         f"the mapper checkpoint {checkpoint} was trained with — drop --template "
                         f"(the checkpoint's is used), or train a mapper with --template "
                         f"{requested}")
    return trained


def demonstration_pool(train: Sequence[Mention] | None, nil: bool) -> list[Mention] | None:
    """The training mentions that may be demonstrations and feed the prior: NIL ones only in
    NIL mode (elsewhere their answer is no KB title, and showing it would teach a wrong format)."""
    if train is None:
        return None
    return list(train) if nil else [m for m in train if not is_nil(m)]


def fit_retriever(config: LinkerConfig, train: Sequence[Mention]):
    """The config's demonstration retriever, fitted on its demonstration pool."""
    return make_retriever(config).fit(demonstration_pool(train, config.nil))


def make_retriever(config: LinkerConfig):
    """The demonstration retriever named by the config (simcse uses ``config.sentence_model``)."""
    options = {"seed": config.seed} if config.retriever == "random" else {}
    if config.retriever == "simcse":
        options["model"] = config.sentence_model
    return get_retriever(config.retriever, **options)


__all__ = ["Linker", "LinkerConfig", "linker_config"]
