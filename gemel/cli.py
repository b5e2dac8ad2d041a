"""The ``gemel`` command."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from gemel.errors import GemelError
from gemel.files import write_atomic
from gemel.eval.baselines import KINDS as BASELINE_KINDS

# the flags live in gemel.options (one definition each); imported here under their old names
from gemel.options import (DATA_FORMATS, backend_option, data_options, echo_err, fusion_option,  # noqa: F401
                           linker_options, progress_option, prompt_options, read_data, read_kb,
                           read_train, shard_option, strict_option, training_options)

# exit codes (README "Exit codes"): 0 done; 1 unexpected error (a bug: please report the
# traceback); 2 bad usage or bad input, nothing linked; 3 finished, but some mentions are error
# rows; 130 interrupted (a rerun resumes)
EXIT_ERROR_ROWS = 3


class GemelGroup(click.Group):
    """Turns a GemelError into its message and exit code 2, also under click's CliRunner."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GemelError as err:
            raise InputError(err) from err


class InputError(click.ClickException):
    """Bad input, or a model that cannot be had: "error: <what, where, fix>", exit code 2."""

    exit_code = 2

    def __init__(self, err: GemelError):
        super().__init__(str(err))
        self.error = err

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


@click.group(cls=GemelGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """gemel: generative multimodal entity linking."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--kb", "kb_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Knowledge base JSONL.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Mentions: our JSONL or a public release file.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions JSONL: written only when absent, empty, or gemel's own "
              "predictions of the same input and settings (then resumed).")
@linker_options
@prompt_options
@fusion_option
@shard_option
@data_options
@strict_option
@backend_option
@click.pass_context
def link(ctx, kb_path, data_path, out_path, config_path, model, num_beams, top_k, batch_size,
         template, dtype, device, trie, length_penalty, progress, mapper, no_image, feature_cache,
         train_path, train_split, demos, retriever, num_candidates, fusion, max_prompt_tokens, nil,
         shard, fmt, split, splits_path, images_dir, limit, strict, backend):
    """Link every mention in --data to the KB; write ranked candidates to --out.

    Under `torchrun --nproc_per_node N -m gemel.cli link ...` each process links its shard of
    the mentions into OUT.shard-R-of-N.jsonl, and process 0 merges them into --out."""
    from gemel.linker import Linker, linker_config
    from gemel.runs import (check_output, merge_parts, open_output, run, select_shard,
                            shard_part_path)

    # every argument is checked before any file is opened for writing
    config = linker_config(config_path, model=model, num_beams=num_beams, top_k=top_k,
                           batch_size=batch_size, template=template, dtype=dtype, device=device,
                           trie=trie, length_penalty=length_penalty, demos=demos,
                           retriever=retriever, num_candidates=num_candidates, fusion=fusion,
                           max_prompt_tokens=max_prompt_tokens, mapper=mapper, no_image=no_image,
                           feature_cache=feature_cache, nil=nil, backend=backend)
    ranks = distributed_ranks()
    if ranks is not None:
        if shard is not None:
            raise click.UsageError("--shard and torchrun both split the mentions: give one")
        shard = ranks
        config = local_device(config)
    identity = link_identity(config, kb_path, data_path, fmt, split, splits_path, train_path,
                             train_split)
    part = shard_part_path(out_path, shard) if ranks is not None else out_path
    if ranks is not None and ranks[0] == 0:
        check_output(out_path, dict(identity, shard=None))  # the merged file, written at the end
    check_output(part, dict(identity, shard=shard))
    # then the inputs and the model: bad input fails here, with nothing written
    kb = read_kb(kb_path, strict)
    everything = read_data(data_path, fmt, split, splits_path, images_dir, limit, strict)
    mentions = select_shard(everything, shard)
    train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir, strict)
    t0 = time.perf_counter()
    linker = Linker.from_config(config, kb=kb, train=train)
    t_load = time.perf_counter() - t0
    kb_notes = report_kb(kb, linker, everything, strict)
    with open_output(part, dict(identity, shard=shard), about=run_about(linker)) as held:
        t0 = time.perf_counter()  # (checked again, locked)
        rows = run(lambda batch: linker.link_batch(batch), mentions, held,
                   batch_size=linker.config.batch_size, progress=progress, source=str(data_path))
        t_link = time.perf_counter() - t0
    click.echo(f"linked {len(rows)} mentions in {t_link:.1f}s "
               f"({t_link / max(len(mentions), 1):.3f} s/mention; model load {t_load:.1f}s)"
               + (f" -> shard {shard[0]}/{shard[1]}: {part}" if shard else ""))
    if ranks is not None:
        barrier()
        if ranks[0] != 0:
            return
        parts = [shard_part_path(out_path, (r, ranks[1])) for r in range(ranks[1])]
        rows = merge_parts(parts, everything, out_path, source=str(data_path))
        click.echo(f"merged {len(parts)} parts into {out_path}")
        mentions = everything
    if linker.box_only_from_text:
        click.echo(f"{linker.box_only_from_text} box-only mention(s) (no mention string) linked "
                   f"from their text alone: --no-image ablation")
    summary = {"mentions": len(rows), "kb_entities": len(kb), "model": linker.config.model,
               "dtype": str(linker.backend.dtype).replace("torch.", ""),
               "load_seconds": round(t_load, 2), "link_seconds": round(t_link, 2),
               "seconds_per_mention": round(t_link / max(len(mentions), 1), 4),
               "trie_boundary_merged": len(getattr(linker.trie, "boundary_merged", [])),
               # titles that end either in a token merged with the terminator or in the terminator
               "trie_terminator_merged": len(getattr(linker.trie, "terminator_merged", [])),
               "box_only_from_text": linker.box_only_from_text, **kb_notes}
    if any(m.entity_id is not None for m in mentions):
        summary.update(evaluation_summary(linker, kb, rows, mentions, train, out_path))
    if linker.model.image_embedder is not None:
        summary["images"] = image_summary(linker.model.image_embedder)
    metrics_path = Path(out_path).with_suffix(".metrics.json")
    write_atomic(metrics_path, json.dumps(summary, indent=2) + "\n")
    click.echo(f"predictions: {out_path}\nmetrics: {metrics_path}")
    end_of_run(ctx, rows, out_path)


def evaluation_summary(linker, kb, rows: list[dict], mentions, train, out_path) -> dict:
    """The one summary of `gemel eval` for --out beside the exact-match baseline on the same
    mentions (echoed), as the metrics file's ``gemel``, ``exact_match`` and ``paired`` entries."""
    from gemel.eval.baselines import exact_match
    from gemel.eval.summary import evaluate_files, format_summary

    result = evaluate_files([(str(out_path), rows), ("exact-match baseline", [
        r.to_json() for r in exact_match(kb, mentions)])], mentions, train=train, kb=kb)
    gemel_metrics, exact = result["files"]
    if linker.config.num_candidates:
        gemel_metrics["num_candidates"] = linker.config.num_candidates  # C of recall@C
    click.echo("gemel beside the exact-match baseline, on the same mentions:")
    click.echo(format_summary(result))
    return {"gemel": gemel_metrics, "exact_match": exact, "paired": result["paired"]}


def image_summary(images) -> dict:
    """Images encoded, seconds per encoded image and the feature cache's counts (echoed);
    ``images``: the linker's :class:`gemel.image_tokens.ImageTokens`."""
    encoded = images.encoder.stats
    summary = {"encoded": encoded["images"],
               "seconds_per_encoded_image": round(encoded["seconds"] / encoded["images"], 4)
               if encoded["images"] else None}
    if images.cache is not None:
        summary["feature_cache"] = {**images.cache.stats, "hit_rate": round(images.cache.hit_rate, 4)}
        click.echo(images.cache.summary())
    click.echo(f"images encoded: {encoded['images']} "
               f"({summary['seconds_per_encoded_image'] or 0:.3f} s/image)")
    return summary


def report_kb(kb, linker, mentions, strict: bool) -> dict:
    """Tell what in the KB cannot be linked as asked (before linking), for the metrics file:
    gold entities absent from it, titles too long to be generated, titles shared by entities."""
    from gemel.data.inputs import gold_absent, gold_absent_message

    notes = {"kb_bad_records": kb.bad.count}
    absent = gold_absent(mentions, kb)
    notes["gold_not_in_kb"] = absent
    message = gold_absent_message(absent, sum(m.entity_id is not None for m in mentions))
    if message:
        echo_err(message)
    long = linker.long_titles()
    notes["titles_longer_than_max_new_tokens"] = len(long)
    if long:
        text = (f"{len(long)} KB title(s) take more than max_new_tokens="
                f"{linker.config.max_new_tokens} tokens and can never be generated, e.g. "
                f"{long[:3]} — raise max_new_tokens (--config YAML) or shorten the titles")
        if strict:
            raise GemelError(text)
        echo_err(text)
    shared, holders = kb.shared_titles()
    notes["shared_titles"] = {"titles": shared, "entities": holders}
    if shared:
        echo_err(f"note: {shared} KB title(s) are shared by {holders} entities; entities sharing "
                 "a title are all candidates of that title, with its score")
    return notes


def end_of_run(ctx: click.Context, rows: list[dict], out_path) -> None:
    """A run with error rows says so (how many, the first messages) and exits with code 3."""
    from gemel.runs import error_summary

    text = error_summary(rows)
    if text:
        click.echo(f"{text}\n(in {out_path}; exit code {EXIT_ERROR_ROWS})", err=True)
        ctx.exit(EXIT_ERROR_ROWS)


def distributed_ranks() -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def local_device(config):
    """Under torchrun on a machine with GPUs, --device auto means this process's own GPU."""
    import dataclasses
    import os

    import torch

    if config.device == "auto" and torch.cuda.is_available():
        gpu = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return dataclasses.replace(config, device=f"cuda:{gpu}")
    return config


def barrier() -> None:
    """Wait until every torchrun process has written its part (gloo: works with or without GPUs;
    the processes may finish hours apart, hence the long timeout)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()


def run_about(linker) -> dict:
    """What a report says made a run's predictions (see gemel.runs.open_output), whether or not
    the settings are defaults: model, template, backend, resolved dtype, device, CPU flags."""
    from gemel.eval.measure import cpu

    config = linker.config
    return {"model": config.model, "template": config.template, "backend": config.backend,
            "dtype": str(linker.backend.dtype).replace("torch.", ""),
            "device": linker.backend.device, "cpu_flags": " ".join(cpu()["flags"])}


def link_identity(config, kb_path, data_path, fmt, split, splits_path, train_path,
                  train_split) -> dict:
    """What `gemel link` records beside --out: the input, and the settings that change results."""
    from gemel.runs import input_identity, path_sha256, settings_identity

    train = (path_sha256(train_path) if train_path else
             f"split {train_split} of --data" if train_split else None)
    return {"input": input_identity(data_path, fmt or "auto", split, splits_path),
            "settings": settings_identity(config, kb=path_sha256(kb_path), train=train)}


@cli.command("build-trie")
@click.option("--kb", "kb_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Whose tokenizer the trie is for.")
@click.option("--template", default=None,
              help="The template whose answer prefix and terminator the trie follows [the model's "
              "default: gemel].")
@click.option("--terminator", default=None, help="Override the terminator text (default: the "
              "template's text after the answer, e.g. a newline).")
@click.option("--nil", is_flag=True, default=False, help="Add the reserved answer NIL (for link --nil).")
def build_trie_cmd(kb_path, out_dir, model, template, terminator, nil):
    """Tokenize the KB titles once and save the entity trie (.npy + JSON) for reuse with --trie."""
    from gemel.kb import KnowledgeBase
    from gemel.trie_store import build_trie
    from gemel.prompting import PromptBuilder
    from gemel.sources import default_template, load_tokenizer

    kb = read_kb(kb_path)
    tokenizer = load_tokenizer(model)
    builder = PromptBuilder(template or default_template(model), tokenizer)
    t0 = time.perf_counter()
    trie = build_trie(kb, tokenizer, builder.answer_prefix, terminator or builder.terminator_text,
                      nil=nil)
    trie.save(out_dir)
    merged = getattr(trie, "boundary_merged", [])
    click.echo(f"trie of {len(trie)} titles in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    if merged:
        click.echo(f"{len(merged)} title(s) merge with the answer prefix when tokenized "
                   f"(tokenized alone instead), e.g. {merged[:3]}")
    ends = trie.terminator_merged
    click.echo(f"{len(ends)} title(s) merge their last characters with the terminator text "
               f"{trie.meta.get('terminator_text')!r}; they end either way (merged token, or "
               f"their own tokens + the terminator)" + (f", e.g. {ends[:3]}" if ends else ""))


@cli.command()
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_mentions", required=True, type=click.Path(dir_okay=False),
              help="Mentions JSONL to write.")
@click.option("--kb-out", "out_kb", default=None, type=click.Path(dir_okay=False),
              help="KB JSONL to write.")
@click.option("--kb-from", type=click.Choice(["gold", "names", "both"]), default="gold",
              show_default=True, help="KB from the gold entities, from --qid2ne, or both.")
@click.option("--qid2ne", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--qid2abs", type=click.Path(exists=True, dir_okay=False), default=None)
@data_options
@strict_option
def convert(data_path, out_mentions, out_kb, kb_from, qid2ne, qid2abs, fmt, split, splits_path,
            images_dir, limit, strict):
    """Convert a public MEL release into gemel's mentions JSONL (and a KB JSONL)."""
    from gemel.data import convert as convert_release

    summary = convert_release(data_path, out_mentions, out_kb, fmt=fmt or "auto", split=split,
                              splits_path=splits_path, images_dir=images_dir, kb_from=kb_from,
                              qid2ne=qid2ne, qid2abs=qid2abs, limit=limit,
                              on_bad="raise" if strict else "skip")
    click.echo(json.dumps(summary, indent=2))


@cli.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The mentions the parts were linked from (gives the order, and every id).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions JSONL to write (same rules as `gemel link --out`).")
@data_options
@click.pass_context
def merge(ctx, parts, data_path, out_path, fmt, split, splits_path, images_dir, limit):
    """Join the parts of `gemel link --shard i/n` runs into one predictions file, in input order.

    Every mention must be in exactly one part: an overlap or a gap is refused, naming ids."""
    from gemel.runs import input_identity, merge_parts

    mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit)
    rows = merge_parts(parts, mentions, out_path, source=str(data_path),
                       identity={"input": input_identity(data_path, fmt or "auto", split,
                                                         splits_path)})
    click.echo(f"merged {len(parts)} parts: {len(rows)} mentions -> {out_path}")
    end_of_run(ctx, rows, out_path)


@cli.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@progress_option
@click.option("--finished-only", is_flag=True,
              help="Link nothing: write the table from the cells already finished, and say how far "
              "each unfinished cell got (a grid run over several sessions).")
def sweep(config_path, progress, finished_only):
    """Run a YAML grid of experiments (prompt settings, models); write results.csv/.md/.png,
    scaling.png and cells.json. A rerun resumes what the last one left."""
    from gemel.eval.sweep import run_sweep

    rows = run_sweep(config_path, progress=progress, finished_only=finished_only)
    shown = ("cell", "H@1", "H@5", "H@1 generation", "LLM adds H@1", "s_per_mention")
    for r in rows:  # the headline; results.md / results.csv hold every column
        click.echo(" | ".join(f"{k} {r[k]}" for k in shown if r.get(k) is not None))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model (with the exact "
              "pins of every part).")
def models(as_json):
    """List the offline models: kind, parameters, size, installed or not, pip line, origin, license."""
    from gemel.sources import LADDER_EXTRA, OFFLINE, model_status

    rows = [model_status(name) for name in OFFLINE]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return

    def billions(n):
        if n is None:
            return "-"
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e8 else f"{n / 1e6:.1f}M"

    table = [("name", "kind", "params", "non-emb", "size", "installed", "ready", "install")]
    for r, spec in zip(rows, OFFLINE.values()):
        table.append((r["name"], r["kind"], billions(r["parameters"]), billions(r["non_embedding"]),
                      "-" if r["bytes"] is None else f"{r['bytes'] / 2**20:.0f} MiB", r["installed"],
                      "yes" if r["ready"] else "no",
                      LADDER_EXTRA if spec.assembled else r["pip"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    click.echo("\nready: converted (GGUF dequantised, ONNX unpacked) in the cache already; "
               "exact part pins: gemel models --json")
    for r in rows:
        click.echo(f"\n{r['name']}: {r['format']}\n  origin:  {r['origin']}\n  license: {r['license']}")


@cli.command("fit-fusion")
@click.option("--kb", "kb_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="Dev mentions with gold.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Fusion model JSON to write; the dev rows (every candidate pool) go beside it "
              "as <out>.dev.jsonl, and a rerun resumes them.")
@click.option("--rows", "rows_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Refit from dev rows already written (a .dev.jsonl, or `gemel link --fusion` "
              "output with gold), several files merged: no LLM pass, no --kb/--data.")
@click.option("--l2", "l2s", multiple=True, type=float, default=(1e-4, 1e-3, 1e-2, 1e-1),
              show_default=True, help="L2 strengths; with several, 5-fold cross-validation "
              "on dev picks one.")
@click.option("--drop", multiple=True, help="Leave this feature out (weight 0), for ablations, "
              "e.g. --drop llm_logprob --drop llm_beam --drop llm_logprob_unseen.")
@click.option("--pool", "fusion_pool", type=click.IntRange(min=1), default=None,
              help="Retrieved titles added to the candidates (beams, prior, exact matches) [16].")
@linker_options
@prompt_options
@data_options
@strict_option
def fit_fusion(kb_path, data_path, out_path, rows_paths, l2s, drop, fusion_pool, config_path,
               model, num_beams, top_k, batch_size, template, dtype, device, trie, length_penalty,
               progress, mapper, no_image, feature_cache, train_path, train_split, demos,
               retriever, num_candidates, max_prompt_tokens, nil, fmt, split, splits_path, images_dir,
               limit, strict):
    """Fit the fused ranking (LLM log-prob, retriever similarity, prior, exact title) on dev.

    The flags that build the linker mean what they mean in `gemel link` (there is no --fusion:
    this command makes one)."""
    from gemel.fusion import check_fusion_out, fit_on_mentions, fit_report, rows_lists
    from gemel.runs import read_done

    check_fusion_out(out_path)
    if rows_paths:
        lists = [x for p in rows_paths for x in rows_lists(list(read_done(Path(p)).values()), p)]
        model_, report = fit_report(lists, l2s, drop=drop)
        rows_note = ", ".join(rows_paths)
    else:
        if not (kb_path and data_path):
            raise click.UsageError("give --kb and --data (dev mentions), or --rows to refit")
        from gemel.kb import KnowledgeBase
        from gemel.linker import Linker, linker_config
        from gemel.runs import check_output, open_output

        config = linker_config(config_path, model=model, num_beams=num_beams, top_k=top_k,
                               batch_size=batch_size, template=template, dtype=dtype,
                               device=device, trie=trie, length_penalty=length_penalty,
                               demos=demos, retriever=retriever, num_candidates=num_candidates,
                               max_prompt_tokens=max_prompt_tokens, fusion_pool=fusion_pool,
                               mapper=mapper, no_image=no_image, feature_cache=feature_cache,
                               nil=nil)
        if config.fusion is not None:
            raise click.UsageError(f"{config_path}: fit-fusion fits a fusion model; a config "
                                   "naming one (fusion:) has no use here — drop that key")
        rows_note = str(Path(out_path).with_suffix(".dev.jsonl"))
        identity = link_identity(config, kb_path, data_path, fmt, split, splits_path,
                                 train_path, train_split)
        identity = dict(identity, shard=None, purpose="fit-fusion")
        check_output(rows_note, identity)
        kb = read_kb(kb_path, strict)
        mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit, strict)
        train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir,
                           strict)
        linker = Linker.from_config(config, kb=kb, train=train)
        with open_output(rows_note, identity) as held:
            model_, report = fit_on_mentions(linker, mentions, held, progress=progress, l2s=l2s,
                                             source=str(data_path), drop=drop)
    model_.save(out_path)
    click.echo(json.dumps(report, indent=2))
    click.echo(f"fusion model: {out_path} (dev rows: {rows_note})")


def train_options(f):
    """Training mentions for `gemel eval` (seen/unseen split) and `gemel baseline` (prior)."""
    f = click.option("--train-split", default=None,
                     help="Take the training mentions from this split of --data (with --splits).")(f)
    f = click.option("--train", "train_path", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="Training mentions (JSONL or release file).")(f)
    return f


@cli.command("eval")
@click.argument("pred_paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The mentions the predictions were made from (their gold is the truth).")
@click.option("--kb", "kb_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="KB JSONL: gold titles for the mention = title split.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the summary as JSON (a stable contract, see README).")
@click.option("--resamples", type=int, default=1000, show_default=True,
              help="Bootstrap resamples for the intervals and paired tests.")
@click.option("--seed", type=int, default=0, show_default=True)
@train_options
@data_options
def eval_cmd(pred_paths, data_path, kb_path, json_path, resamples, seed, train_path, train_split,
             fmt, split, splits_path, images_dir, limit):
    """H@1/3/5/10 and MRR with 95% bootstrap intervals, seen/unseen and mention = title splits,
    and a paired bootstrap of H@1 for every pair of files."""
    from gemel.eval.summary import evaluate_files, format_summary, read_predictions, write_json
    from gemel.kb import KnowledgeBase

    mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit)
    train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir)
    kb = KnowledgeBase.from_jsonl(kb_path) if kb_path else None
    result = evaluate_files([(p, read_predictions(p)) for p in pred_paths], mentions, train=train,
                            kb=kb, n_resamples=resamples, seed=seed)
    click.echo(format_summary(result))
    if json_path:
        write_json(result, json_path)
        click.echo(f"json: {json_path}")


@cli.command()
@click.option("--kind", required=True, type=click.Choice(BASELINE_KINDS),
              help="exact | prior | dense | dense-context | combo | combo-context.")
@click.option("--kb", "kb_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions JSONL: written only when absent, empty, or this same baseline's "
              "predictions (then resumed).")
@click.option("--top-k", type=int, default=10, show_default=True, help="Candidates per mention.")
@click.option("--sentence-model", default="minilm-l6-v2", show_default=True,
              help="Sentence encoder of the dense kinds.")
@click.option("--progress/--no-progress", default=True)
@train_options
@data_options
def baseline(kind, kb_path, data_path, out_path, top_k, sentence_model, progress, train_path,
             train_split, fmt, split, splits_path, images_dir, limit):
    """Non-LLM baseline predictions in the usual format, to set beside gemel with `gemel eval`."""
    from gemel.eval.baselines import check_baseline, run_baseline
    from gemel.eval.summary import evaluate_files, format_summary
    from gemel.kb import KnowledgeBase
    from gemel.runs import run

    kb = KnowledgeBase.from_jsonl(kb_path)
    mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit)
    train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir)
    check_baseline(kind, train, top_k)
    from gemel.runs import input_identity, path_sha256

    retrievers: dict = {}
    t0 = time.perf_counter()
    # --out follows `gemel link`'s rule: written only when absent, empty or this same baseline
    identity = {"input": input_identity(data_path, fmt or "auto", split, splits_path),
                "settings": {"baseline": kind, "kb": path_sha256(kb_path), "top_k": top_k,
                             "sentence_model": sentence_model,
                             "train": (path_sha256(train_path) if train_path else
                                       f"split {train_split} of --data" if train_split else None)}}
    rows = run(lambda batch: run_baseline(kind, kb, batch, train, top_k, sentence_model, retrievers),
               mentions, out_path, batch_size=512, progress=progress, source=str(data_path),
               identity=identity)
    click.echo(f"baseline {kind}: {len(rows)} mentions in {time.perf_counter() - t0:.1f}s "
               f"-> {out_path}")
    if any(m.entity_id is not None for m in mentions):
        click.echo(format_summary(evaluate_files([(str(out_path), rows)], mentions, train=train,
                                                 kb=kb)))


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's data, mapper, predictions and report.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Mapper training epochs [the demo's default].")
@click.option("--demos", type=click.IntRange(min=0), default=None,
              help="Demonstrations per prompt [the demo's default].")
def demo(out, epochs, demos):
    """The main job on the data that ships with gemel: train a mapper, link with and without
    images, beside the combo baseline; a table here and a report folder in --out."""
    from gemel.demo.run import DemoSettings, run_demo

    settings = DemoSettings(out=out)
    if epochs is not None:
        settings.epochs = epochs
    if demos is not None:
        settings.demos = demos
    run_demo(settings, echo=click.echo)


@cli.command("train")
@click.option("--kb", "kb", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Knowledge base JSONL.")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training mentions: our JSONL or a public release file.")
@click.option("--dev", "dev", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dev mentions (default: --data with --dev-split).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (best/, last/, train_log.jsonl); an existing run in it is "
              "continued with --resume, never overwritten.")
@training_options
def train_command(config_path, resume, cpu, fmt, splits_path, images_dir, **flags):
    """Train the linear mapper (frozen LLM and vision encoder) and keep the best by dev H@1."""
    from gemel.config import from_dict, load_yaml
    from gemel.train import TrainConfig, train

    values = load_yaml(config_path) if config_path else {}
    values.update({k: v for k, v in dict(flags, format=fmt, splits=splits_path, images=images_dir,
                                         resume=resume or None, cpu=cpu or None).items()
                   if v is not None})
    config = from_dict(TrainConfig, values, source=config_path or "<flags>")
    summary = train(config)
    if summary["process_index"] == 0:
        click.echo(json.dumps(summary, indent=2))


def main() -> None:
    try:
        code = cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except GemelError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if isinstance(code, int) and code:  # ctx.exit(3): finished with error rows
        sys.exit(code)


if __name__ == "__main__":
    main()
