"""What a run trains and evaluates on: the KB, the training items, the dev mentions, and the
order in which an epoch visits the items."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gemel.errors import DataError, GemelError
from gemel.kb import KnowledgeBase
from gemel.train.config import TrainConfig
from gemel.types import Mention

log = logging.getLogger(__name__)

DemosFor = Callable[[Mention], Sequence[Mention]]


def no_demonstrations(mention: Mention) -> list[Mention]:
    return []


@dataclass(frozen=True)
class Item:
    """A training item: a mention with an image, and its gold title's index in the KB."""

    mention: Mention
    title_index: int


@dataclass
class TrainingData:
    kb: KnowledgeBase
    items: list[Item]
    skipped: dict[str, int]  # training mentions left out, by reason (see training_items)
    dev_mentions: list[Mention]  # those with a gold entity id


def load_data(config: TrainConfig, kb: KnowledgeBase | None = None,
              train_mentions: Sequence[Mention] | None = None,
              dev_mentions: Sequence[Mention] | None = None) -> TrainingData:
    """The KB and mentions the config names (objects given replace them); no item is an error."""
    if kb is None:
        if not config.kb:
            raise GemelError("training needs a KB (--kb FILE)")
        from gemel.data.inputs import load_kb

        kb = load_kb(config.kb, config.strict)
    if train_mentions is None:
        if not config.data:
            raise GemelError("training needs training mentions (--data FILE)")
        train_mentions = training_mentions(config.data, config, config.split, config.limit)
    if dev_mentions is None and (config.dev or config.dev_split):
        dev_path = config.dev or config.data
        dev_mentions = training_mentions(dev_path, config, config.dev_split, config.dev_limit)
    items, skipped = training_items(train_mentions, kb, source=config.data)
    if not items:
        raise DataError(f"no training item: every mention lacks an image or a gold entity in the KB "
                        f"({skipped})", path=config.data,
                        fix="check --images (the image folder) and that the KB holds the gold ids")
    return TrainingData(kb, items, skipped,
                        [m for m in (dev_mentions or []) if m.entity_id is not None])


def training_mentions(path, config: TrainConfig, split: str | None, limit: int | None
                      ) -> list[Mention]:
    """Training or dev mentions: bad records skipped and reported (``config.strict``: an error)."""
    from gemel.data.inputs import load_mentions

    return load_mentions(path, config.format, split, config.splits if split else None,
                         config.images, limit, role="pool", strict=config.strict)


def training_items(mentions: Sequence[Mention], kb: KnowledgeBase, source: object = None
                   ) -> tuple[list[Item], dict[str, int]]:
    """Mentions with an image and a gold entity in the KB, with the gold title's index.

    The rest is counted by reason: ``no_gold`` (NIL or unlabelled), ``not_in_kb``, ``no_image``
    (nothing for the mapper to learn from)."""
    items, skipped = [], {"no_gold": 0, "not_in_kb": 0, "no_image": 0}
    for mention in mentions:
        if mention.entity_id is not None:
            if mention.entity_id not in kb:
                skipped["not_in_kb"] += 1
                continue
            title = kb[mention.entity_id].title
        elif mention.entity and mention.entity != "NIL":
            title = mention.entity
        else:
            skipped["no_gold"] += 1
            continue
        index = kb.title_index(title)
        if index < 0:
            skipped["not_in_kb"] += 1
            continue
        if not mention.image:
            skipped["no_image"] += 1
            continue
        items.append(Item(mention, index))
    if skipped["not_in_kb"]:
        log.warning("%s: %d training mention(s) have a gold entity that is not in the KB; skipped",
                    source or "training data", skipped["not_in_kb"])
    return items, skipped


class EpochOrder:
    """Indices 0..n-1 in an order fixed by (seed, epoch): a resumed run replays the same order.

    The epoch is set with :meth:`use_epoch` (deliberately not ``set_epoch``, which accelerate calls
    with its own counter of dataloader passes)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def collate_indices(indices: list[int]) -> torch.Tensor:
    """A batch of item indices as one tensor (what the DataLoader hands out)."""
    return torch.tensor(indices, dtype=torch.long)


__all__ = ["Item", "TrainingData", "load_data", "training_items", "EpochOrder", "DemosFor",
           "no_demonstrations"]
