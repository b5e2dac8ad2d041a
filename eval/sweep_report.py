"""A sweep's rows -> results.csv (every number), results.md (table with 95% bootstrap intervals and
the environment), results.png (H@k per cell), scaling.png (H@1 and s/mention vs parameters)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# results.md: (column title, row keys: value[, interval lo, hi]) in this order; a column shows
# where some row has a value
MD_COLUMNS = [
    ("params", ("parameters",)), ("non-emb", ("non_embedding",)), ("dtype", ("dtype",)),
    ("n", ("n",)),
    ("H@1", ("H@1", "H@1 lo", "H@1 hi")), ("H@5", ("H@5", "H@5 lo", "H@5 hi")),
    ("MRR", ("MRR", "MRR lo", "MRR hi")),
    ("generation H@1", ("H@1 generation", "H@1 generation lo", "H@1 generation hi")),
    ("generation H@5", ("H@5 generation", "H@5 generation lo", "H@5 generation hi")),
    ("fusion without LLM H@1", ("H@1 fusion without LLM", "H@1 fusion without LLM lo",
                                "H@1 fusion without LLM hi")),
    ("LLM adds (H@1)", ("LLM adds H@1", "LLM adds lo", "LLM adds hi")),
    ("p", ("LLM adds p",)), ("gold in pool", ("gold in pool",)), ("headroom", ("headroom",)),
    ("LLM right there", ("LLM right there",)), ("fixed", ("fixed",)), ("broke", ("broke",)),
    ("s/mention", ("s_per_mention",)), ("s/mention generation", ("s_per_mention generation",)),
    ("prefill tok/s", ("prefill_tokens_per_s",)), ("peak RSS GiB", ("peak_rss_gib",)),
    ("load s", ("load_seconds",)), ("recall@C", ("recall@C",)), ("errors", ("errors",)),
    ("status", ("status",)),
]


def metric_row(name: str, config, preds: list[dict], mentions: dict, measured: dict,
               no_llm=None) -> dict:
    """One table row: H@1/H@5 and MRR of the cell's ranking with 95% bootstrap intervals
    (gemel.eval.summary, the one evaluation summary); when the run kept pure generation's ranking
    (a fused run), the same for it; with ``no_llm`` (the cell's fusion refitted without the LLM's
    features), that ranking of the same pools and the paired difference (fused minus without
    LLM); and the cell's measurements (parameters, dtype, times, peak RSS).
    ``mentions``: id -> Mention, the gold the predictions are scored against."""
    from gemel.eval.metrics import generation_rows
    from gemel.eval.summary import metrics_block, paired_entry, score_rows
    from gemel.fusion import rerank

    scores = score_rows(preds, mentions, name)
    block = metrics_block(scores)
    row = {"cell": name, "model": getattr(config, "model", None),
           "parameters": measured.get("parameters"), "non_embedding": measured.get("non_embedding"),
           "dtype": measured.get("dtype"), "n": block["n"], "errors": block["errors"]}
    row.update(_with_ci("", block))
    if any("generated" in p for p in preds):
        row.update(_with_ci(" generation", metrics_block(score_rows(generation_rows(preds),
                                                                    mentions, name))))
    if no_llm is not None:
        k = max(getattr(config, "top_k", 5), 5)
        plain = score_rows([rerank(p, no_llm, k=k) for p in preds], mentions, name)
        row.update(_with_ci(" fusion without LLM", metrics_block(plain), metrics=("H@1",)))
        d = paired_entry(plain, scores, "fusion without LLM", "fused")  # fused minus without LLM
        row.update({"LLM adds H@1": d["diff"], "LLM adds lo": d["lo"], "LLM adds hi": d["hi"],
                    "LLM adds p": d["p"]})
        row.update(headroom(preds, plain, scores))
    linked = measured.get("linked") or 0
    row["s_per_mention"] = round(measured["seconds"] / linked, 3) if linked else None
    if no_llm is not None or any("generated" in p for p in preds):
        row["s_per_mention generation"] = (round(measured["generate_seconds"] / linked, 3)
                                           if linked and "generate_seconds" in measured else None)
    prefill = measured.get("prefill")
    row["prefill_tokens_per_s"] = round(prefill[0] / prefill[1], 1) if prefill and prefill[1] else None
    for key in ("peak_rss_gib", "load_seconds"):
        row[key] = measured.get(key)
    flags = [p["in_candidates"] for p in preds if "in_candidates" in p]
    row["recall@C"] = round(100.0 * sum(flags) / len(flags), 1) if flags else None
    return row


def headroom(preds: list[dict], plain, fused) -> dict:
    """Why the LLM adds what it adds: the gold's presence in the fusion pool caps any reranker
    (``gold in pool``, percent); of the mentions the fusion without the LLM gets wrong with the
    gold in the pool (``headroom``, a count), on how many the LLM's own sequence log-probability
    (the ``llm_logprob`` feature) ranks the gold first among the pool (``LLM right there``);
    and the fused ranking's paired flips against the fusion without the LLM (``fixed``/``broke``).
    ``plain`` / ``fused``: gemel.eval.summary.Scores of the same mentions."""
    plain_hit = dict(zip(plain.ids, plain.values("H@1")))
    fused_hit = dict(zip(fused.ids, fused.values("H@1")))
    in_pool = room = llm_right = fixed = broke = 0
    scored = 0
    for p in preds:
        pool, rid = p.get("pool"), str(p["id"])
        if not pool or rid not in plain_hit or p.get("gold_id") is None:
            continue
        scored += 1
        gold_at = [i for i, ids in enumerate(pool["ids"]) if p["gold_id"] in ids]
        fixed += bool(fused_hit[rid] and not plain_hit[rid])
        broke += bool(plain_hit[rid] and not fused_hit[rid])
        if not gold_at:
            continue
        in_pool += 1
        if plain_hit[rid]:
            continue
        room += 1
        column = pool["features"].index("llm_logprob")
        logprobs = [values[column] for values in pool["values"]]
        llm_right += max(range(len(logprobs)), key=logprobs.__getitem__) in gold_at
    return {"gold in pool": round(100.0 * in_pool / scored, 1) if scored else None,
            "headroom": room, "LLM right there": llm_right, "fixed": fixed, "broke": broke}


def _with_ci(suffix: str, block: dict, metrics=("H@1", "H@5", "MRR")) -> dict:
    """``H@1<suffix>`` ... and their 95% bounds ``... lo`` / ``... hi`` from a metrics block."""
    out = {}
    for metric in metrics:
        key = f"{metric}{suffix}"
        ci = (block.get("ci95") or {}).get(metric) or (None, None)
        out[key], out[f"{key} lo"], out[f"{key} hi"] = block.get(metric), ci[0], ci[1]
    return out


def _round(x):
    return None if x is None else round(float(x), 2)


def write_outputs(out: Path, rows: list[dict], cells: dict, environment: dict,
                  command: str | None = None) -> None:
    """results.csv / .md / .png, scaling.png (two model sizes or more) and cells.json in ``out``;
    ``command``: what made them, stated at the top of results.md."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, cells, environment)
    if command:
        text = f"Generated by code — do not edit; rerun: `{command}`\n\n" + text
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "cells.json").write_text(json.dumps(cells, indent=2) + "\n", encoding="utf-8")
    measured = [r for r in rows if "H@1" in r]  # not the unfinished cells' status rows
    plot(out / "results.png", measured)
    if len({r["parameters"] for r in measured if r.get("parameters")}) >= 2:
        plot_scaling(out / "scaling.png", measured)


def _fmt(row: dict, keys: tuple) -> str:
    value = row.get(keys[0])
    if value is None:
        return ""
    if keys[0] in ("parameters", "non_embedding"):
        text = f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.0f}M" if value >= 1e7 \
            else f"{value / 1e6:.2f}M"
    elif keys[0].startswith(("H@", "LLM adds H@")):
        text = f"{value:.1f}"
    elif keys[0].startswith("MRR"):
        text = f"{value:.1f}"
    elif isinstance(value, float):
        text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    else:
        text = str(value)
    if len(keys) == 3 and row.get(keys[1]) is not None:
        text += f" [{row[keys[1]]:.1f}, {row[keys[2]]:.1f}]"
    return text


def markdown(rows: list[dict], cells: dict, environment: dict) -> str:
    shown = [(title, keys) for title, keys in MD_COLUMNS if any(r.get(keys[0]) is not None for r in rows)]
    lines = ["| cell | " + " | ".join(t for t, _ in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    lines += ["| " + " | ".join([r["cell"]] + [_fmt(r, keys) for _, keys in shown]) + " |"
              for r in rows]
    lines += ["", "H@k in percent with 95% percentile-bootstrap intervals (1000 resamples of the "
              "mentions); `LLM adds`: fused minus the same fusion refitted without the `llm_*` "
              "features, on the same candidate pools, paired bootstrap interval and two-sided p; "
              "`gold in pool`: percent of mentions whose gold is among the titles fusion ranks "
              "(the ceiling of any reranker); `headroom`: mentions the fusion without the LLM gets "
              "wrong with the gold in the pool; `LLM right there`: of those, how many the LLM's "
              "own sequence log-probability ranks first; `fixed`/`broke`: mentions the fused "
              "ranking gets right/wrong where the fusion without the LLM does not. "
              "s/mention: the whole run (fused: beam search and fusion scoring); `generation`: "
              "prompts and beam search only. params: tied embeddings counted once (offline "
              "models: gemel/offline_models.yaml). peak RSS: the process's peak from the start of "
              "its model's load on; it counts the weight file mapped while loading (file pages, "
              "reclaimable: an offline rung's fp32 cache), so it overstates the memory a run "
              "needs. Each cell's exact config and measurements: cells.json."]
    cpu = environment.get("cpu", {})
    packages = ", ".join(f"{k} {v}" for k, v in environment.get("packages", {}).items() if v)
    lines += ["", "## Environment", "",
              f"- git commit: {environment.get('git_commit')}",
              f"- CPU: {cpu.get('model')}; flags {' '.join(cpu.get('flags', [])) or 'none of interest'}; "
              f"{cpu.get('affinity')} usable of {cpu.get('cpus')} CPUs; torch threads "
              f"{environment.get('torch_threads')}; GPU: {environment.get('cuda') or 'none'}",
              f"- Python {environment.get('python')} on {environment.get('platform')}",
              f"- {packages}"]
    fusion = next((c["fusion"] for c in cells.values() if "fusion" in c), None)
    if fusion:
        lines += ["", f"Fusion: fitted per cell on dev (split {fusion['split']!r}"
                  f"{', file ' + fusion['data'] if fusion['data'] else ''}, first {fusion['limit']} "
                  f"mentions; L2 from {fusion['l2']} by 5-fold cross-validation); the refit without "
                  f"the LLM drops {fusion['ablate'] or 'every llm_* feature'}."]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["cell"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [r["H@1"] or 0 for r in rows], width=0.4, label="H@1")
    ax.bar([i + 0.2 for i in x], [r["H@5"] or 0 for r in rows], width=0.4, label="H@5")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"gemel sweep (n={rows[0]['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows with a parameter count, grouped by their cell name without the ``model=`` part
    (cells that differ only in the model form one line), each sorted by parameters."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("parameters"):
            rest = ",".join(p for p in r["cell"].split(",") if not p.startswith("model="))
            groups.setdefault(rest, []).append(r)
    return {k: sorted(v, key=lambda r: r["parameters"]) for k, v in groups.items()}


def plot_scaling(path: Path, rows: list[dict]) -> None:
    """Left: H@1 (95% intervals) against parameters, log axis — the cell's ranking, pure
    generation and the no-LLM fusion where present; the non-LLM baseline as a band. Right:
    s/mention against parameters (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, group in series(rows).items():
        xs = [r["parameters"] for r in group]
        for key, style in (("H@1", "o-"), ("H@1 generation", "s--"),
                           ("H@1 fusion without LLM", "^:")):
            if all(r.get(key) is not None for r in group):
                ys = [r[key] for r in group]
                err = [[y - (r.get(f"{key} lo") or y) for y, r in zip(ys, group)],
                       [(r.get(f"{key} hi") or y) - y for y, r in zip(ys, group)]]
                name = {"H@1": "fused" if "H@1 generation" in group[0] else "generation"}.get(
                    key, key.replace("H@1 ", ""))
                left.errorbar(xs, ys, yerr=err, fmt=style, capsize=3,
                              label=f"{name} {label}".strip())
        for key, style in (("s_per_mention", "o-"), ("s_per_mention generation", "s--")):
            if all(r.get(key) for r in group):
                right.plot(xs, [r[key] for r in group], style,
                           label=f"{key.replace('s_per_mention', 'run').strip()} {label}".strip())
        for r in group:
            left.annotate(r.get("model") or r["cell"], (r["parameters"], r["H@1"] or 0),
                          textcoords="offset points", xytext=(4, -12), fontsize=7)
    for r in rows:
        if r.get("parameters") is None and r.get("H@1") is not None:  # a non-LLM baseline
            left.axhline(r["H@1"], color="grey", linestyle="-.", linewidth=1, label=r["cell"])
            if r.get("H@1 lo") is not None:
                left.axhspan(r["H@1 lo"], r["H@1 hi"], color="grey", alpha=0.12)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, ScalarFormatter

    # ticks at the models' sizes, named like "135M" / "1.54B" (a log axis over less than a decade
    # otherwise labels every minor tick in scientific notation)
    sizes = sorted({r["parameters"] for r in rows if r.get("parameters")})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"{v / 1e9:.2f}B" if v >= 1e9 else f"{v / 1e6:.0f}M" if v >= 1e6
            else f"{v:.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("parameters (tied embeddings once), log scale")
    left.set_ylabel("H@1 (%), 95% bootstrap interval")
    left.legend(fontsize=7)
    right.set_yscale("log")
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    right.set_xlabel("parameters, log scale")
    right.set_ylabel("seconds per mention (log scale)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    n = next((r["n"] for r in rows if r.get("n")), 0)
    fig.suptitle(f"gemel model scaling (n={n} mentions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
