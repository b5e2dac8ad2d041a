"""Shared fixtures: tiny tokenizers trained on the fly and tiny random LLMs built from configs.

Nothing is downloaded. The real public data is read from $GEMEL_DATA or ../shared/data beside the
repository; tests that need it skip with a reason where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# tests never download: no hub, even where one is reachable (set before transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEMEL_DATA", REPO.parent / "shared" / "data"))

# GPU checks: they run where a CUDA device is (a lent GPU machine), and skip with this reason in CI
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here; this check runs on a GPU machine")

TITLES = ["Paris", "Paris Hilton", "Paris, Texas", "Jordan", "Michael Jordan", "Jordan River",
          "United Kingdom", "Parliament of the United Kingdom", "Barack Obama", "Michelle Obama",
          "Apple Inc.", "Apple", "Amazon (company)", "Amazon River", "Mercury (planet)",
          "Freddie Mercury", "Queen (band)", "Elizabeth II", "Tower Bridge", "London"]

CORPUS = TITLES + [
    "[Text]The Prime Minister spoke to parliament in London.\n[Question]What does parliament "
    "mentioned in the text refer to?\n[Answer]Parliament of the United Kingdom\n",
    "[Text]Obama visited Paris.\n[Question]What does Obama mentioned in the text refer to?\n"
    "[Answer]Barack Obama\n",
    "The river flows through the rain forest. The singer of the band performed at the stadium.",
]


def needs_data(*parts: str) -> Path:
    """Path under the shared data folder, or skip the test with the reason."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"public data not found at {path} (set GEMEL_DATA to ../shared/data)")
    return path


def _wrap(tok_obj):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok_obj, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_bpe_tokenizer()


def make_bpe_tokenizer():
    """Byte-level BPE (GPT-2 / OPT / SmolLM style): leading spaces are part of tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return _wrap(tok)


@pytest.fixture(scope="session")
def sp_tokenizer():
    return make_sp_tokenizer()


def make_sp_tokenizer():
    """SentencePiece-style (LLaMA style): Metaspace '▁' marks word starts, BOS added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(tok)


# Titles whose end merges with the newline terminator in the tokenizer families below, and one
# with a character no training text holds (byte fallback in the SentencePiece style)
MERGE_TITLES = ["Star Trek (film)", "Star Trek", "Queen (band)", "Queen", "Amazon (company)",
                "Amazon River", "Paris", "Zürich"]
MERGE_CORPUS = [f"{t}\n" for t in MERGE_TITLES[:-1] + ["Mercury (planet)", "Jordan (country)"]] + [
    "[Text]The news.\n[Question]What does it mentioned in the text refer to?\n[Answer]"]
# Qwen2.5's pre-tokenizer split (from its tokenizer.json): punctuation keeps the newlines after
# it (" ?[^\s\p{L}\p{N}]+[\r\n]*"), so byte-level BPE learns ")\n" as one token
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen2.5-style byte-level BPE: the Qwen split regex, then bytes; ")\n" is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(MERGE_CORPUS * 5, trainer)
    return _wrap(tok)


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma-style SentencePiece BPE with byte fallback: spaces become '▁', no pre-tokenizer
    split (pieces may hold a newline), characters outside the vocabulary become <0xNN> bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 150, special_tokens=specials)
    tok.train_from_iterator(MERGE_CORPUS * 5, trainer)
    return _wrap(tok)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(vocab_size: int, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def llama_pair(sp_tokenizer):
    return tiny_llama(len(sp_tokenizer)), sp_tokenizer


@pytest.fixture(scope="session")
def opt_pair(bpe_tokenizer):
    return tiny_opt(len(bpe_tokenizer)), bpe_tokenizer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tries and indexes built by tests go to a temporary cache, never the user's."""
    monkeypatch.setenv("GEMEL_CACHE", str(tmp_path_factory.getbasetemp() / "gemel-cache"))
