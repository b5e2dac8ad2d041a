"""Run by tests/test_reliability.py as ``python tests/kill_train_script.py OUTDIR [--resume]``:
trains the tiny mapper of tests/test_train.py with a checkpoint after every optimizer step, so
that the test can SIGKILL it at some step and resume it."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(out: Path, resume: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from tests.conftest import CORPUS, tiny_llama
    from tests.ddp_train_script import _sp_tokenizer
    from tests.test_train import config, make_task, tiny_clip
    from gemel.train import train

    sp = _sp_tokenizer(CORPUS)
    kb, mentions = make_task(out / "images")  # 16 mentions, batch 4: 4 steps per epoch
    train(config(out / "ckpt", epochs=10, batch_size=4, lr=1e-2, warmup=2, eval_every=1,
                 resume=resume),
          llm=tiny_llama(len(sp)), tokenizer=sp, vision=tiny_clip(), kb=kb,
          train_mentions=mentions)


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume" in sys.argv[2:])
