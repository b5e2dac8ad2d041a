"""Run by tests/test_train.py as ``torchrun --nproc_per_node 2 tests/ddp_train_script.py OUTDIR``.

Each process builds the same tiny random models (same seeds), trains the mapper a few steps with
gemel.train.train (accelerate picks up the torchrun environment: gloo on CPU), and writes
OUTDIR/rank<r>.json: the mention ids it trained on and the sha256 of its final mapper weights.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(out: Path) -> None:
    import faulthandler

    import torch

    # never outlive a stuck rendezvous or collective: print where it hangs and exit
    faulthandler.dump_traceback_later(200, exit=True)

    torch.set_num_threads(1)
    os.environ.setdefault("GEMEL_CACHE", str(out / "cache"))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from tests.conftest import CORPUS, tiny_llama
    from tests.test_train import config, make_task, tiny_clip
    from gemel.train import train

    sp = _sp_tokenizer(CORPUS)
    # 16 mentions, batch 4 per process, 2 processes: 2 batches per process per epoch, no padding
    # each process draws its own copy of the images: two writers of one file could race
    kb, mentions = make_task(out / f"images{os.environ.get('RANK', '0')}")
    seen: list[str] = []
    summary = train(config(out / "ckpt", epochs=2, batch_size=4, lr=1e-2, eval_every=0),
                    llm=tiny_llama(len(sp)), tokenizer=sp, vision=tiny_clip(), kb=kb,
                    train_mentions=mentions, dev_mentions=mentions[:4],
                    on_batch=lambda ms: seen.extend(m.id for m in ms))
    rank = summary["process_index"]
    first_epoch = seen[:len(seen) // 2]  # each epoch visits this process's shard once
    record = {"ids": first_epoch, "all_ids": [m.id for m in mentions], "steps": summary["steps"],
              "mapper_sha256": summary["mapper_sha256"],
              "num_processes": summary["num_processes"], "best_dev_h1": summary["best_dev_h1"]}
    (out / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


def _sp_tokenizer(corpus):
    """The LLaMA-style tokenizer of tests/conftest.py's ``sp_tokenizer`` fixture (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(corpus * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
