"""The ``gemel`` command."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from gemel.errors import GemelError
from gemel.retrieval.registry import retriever_names

DATA_FORMATS = ["auto", "native", "wikidiverse", "wikimel", "mimic", "vpwiki"]


def data_options(f):
    """Options shared by every command that reads mentions."""
    f = click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), default="auto",
                     show_default=True, help="Shape of --data.")(f)
    f = click.option("--split", default=None, help="Split to read (train/val/dev/test), with --splits.")(f)
    f = click.option("--splits", "splits_path", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="splits.json selecting record ids per split.")(f)
    f = click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
                     default=None, help="Folder of the release's images.")(f)
    f = click.option("--limit", type=int, default=None, help="Only the first N mentions.")(f)
    return f


def read_data(path, fmt, split, splits_path, images_dir, limit):
    from gemel.data import read_mentions

    return read_mentions(path, fmt=fmt, split=split, splits_path=splits_path,
                         images_dir=images_dir, limit=limit)


def prompt_options(f):
    """Demonstrations, candidates and fusion: shared by `gemel link` and `gemel fit-fusion`."""
    f = click.option("--train", "train_path", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="Training mentions (demonstrations, prior); a release "
                     "file works with --train-split.")(f)
    f = click.option("--train-split", default=None,
                     help="Take the training mentions from this split of --data (with --splits).")(f)
    f = click.option("--demos", type=int, default=None, help="Demonstrations per prompt [0].")(f)
    f = click.option("--retriever", type=click.Choice(retriever_names()),
                     default=None, help="Demonstration retriever [simcse].")(f)
    f = click.option("--candidates", type=int, default=None,
                     help="Restrict decoding to the top-C retrieved KB titles per mention.")(f)
    f = click.option("--fusion", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="A fusion model from `gemel fit-fusion`: rerank beams + retrieved.")(f)
    f = click.option("--max-prompt-tokens", type=int, default=None,
                     help="Token budget: drop the least similar demonstrations first.")(f)
    f = click.option("--nil", is_flag=True, default=None,
                     help="Allow the answer NIL (entity not in the KB; entity_id null in the "
                     "output); NIL training mentions become demonstrations.")(f)
    return f


def read_train(train_path, train_split, data_path, fmt, splits_path, images_dir):
    from gemel.data import read_mentions

    if train_path:
        return read_mentions(train_path, fmt="auto", split=train_split, splits_path=splits_path,
                             images_dir=images_dir)
    if train_split:
        return read_mentions(data_path, fmt=fmt, split=train_split, splits_path=splits_path,
                             images_dir=images_dir)
    return None


@click.group()
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
              help="Predictions JSONL (resumed if it exists).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A YAML LinkerConfig; flags win over it.")
@click.option("--model", default=None, help="LLM: offline name, folder, .gguf or hub id "
              "[default: smollm2-135m-instruct].")
@click.option("--beams", "num_beams", type=int, default=None, help="Beam size [default: 5].")
@click.option("--top-k", type=int, default=None, help="Candidates per mention [default: 5].")
@click.option("--batch-size", type=int, default=None, help="Mentions per forward pass [default: 4].")
@click.option("--template", default=None, help="Prompt template name or .txt path [default: gemel].")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: auto].")
@click.option("--trie", default=None, type=click.Path(exists=True, file_okay=False),
              help="A trie saved by `gemel build-trie` (default: built once and cached).")
@click.option("--backend", default=None, type=click.Choice(["hf", "vllm"]),
              help="Model runtime: hf (transformers) or vllm (optional extra) [default: hf].")
@click.option("--length-penalty", type=float, default=None,
              help="Rank by logprob / len**p (default 0: raw sequence log-probability).")
@click.option("--progress/--no-progress", default=True)
@click.option("--mapper", type=click.Path(exists=True, file_okay=False), default=None,
              help="A mapper checkpoint from `gemel train`: images become soft tokens.")
@click.option("--no-image", is_flag=True, default=None,
              help="Ablation: with --mapper, link text-only.")
@click.option("--feature-cache", default=None,
              help="Folder of cached vision features ('none': memory only) [gemel cache/features].")
@prompt_options
@data_options
def link(kb_path, data_path, out_path, config_path, model, num_beams, top_k, batch_size, template,
         dtype, device, trie, backend, length_penalty, progress, mapper, no_image, feature_cache, train_path,
         train_split,
         demos, retriever, candidates, fusion, max_prompt_tokens, nil, fmt, split, splits_path,
         images_dir, limit):
    """Link every mention in --data to the KB; write ranked candidates to --out."""
    from gemel.eval.baselines import exact_match
    from gemel.eval.metrics import format_hits, generation_rows, hits_at_k
    from gemel.kb import KnowledgeBase
    from gemel.linker import Linker
    from gemel.runs import run

    kb = KnowledgeBase.from_jsonl(kb_path)
    mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit)
    train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir)
    t0 = time.perf_counter()
    linker = Linker.from_config(config_path, kb=kb, train=train, model=model, num_beams=num_beams,
                                top_k=top_k, batch_size=batch_size, template=template, dtype=dtype,
                                device=device, trie=trie, backend=backend,
                                length_penalty=length_penalty,
                                demos=demos, retriever=retriever, candidates=candidates,
                                fusion=fusion, max_prompt_tokens=max_prompt_tokens,
                                mapper=mapper, no_image=no_image, feature_cache=feature_cache,
                                nil=nil)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = run(lambda batch: linker.link_batch(batch), mentions, out_path,
               batch_size=linker.config.batch_size, progress=progress, source=str(data_path))
    t_link = time.perf_counter() - t0
    k = linker.config.top_k
    summary = {"mentions": len(rows), "kb_entities": len(kb), "model": linker.config.model,
               "dtype": str(linker.backend.dtype).replace("torch.", ""),
               "load_seconds": round(t_load, 2), "link_seconds": round(t_link, 2),
               "seconds_per_mention": round(t_link / max(len(mentions), 1), 4),
               "trie_boundary_merged": len(getattr(linker.trie, "boundary_merged", []))}
    click.echo(f"linked {len(rows)} mentions in {t_link:.1f}s "
               f"({summary['seconds_per_mention']:.3f} s/mention; model load {t_load:.1f}s)")
    if any(m.entity_id is not None for m in mentions):
        ks = sorted({1, k})
        summary["gemel"] = hits_at_k(rows, ks)
        summary["exact_match"] = hits_at_k([r.to_json() for r in exact_match(kb, mentions)], ks)
        click.echo(format_hits("gemel", summary["gemel"]))
        if any("generated" in r for r in rows):
            summary["gemel_generation"] = hits_at_k(generation_rows(rows), ks)
            click.echo(format_hits("  pure generation", summary["gemel_generation"]))
        flags = [r["in_candidates"] for r in rows if "in_candidates" in r]
        if flags:
            summary["candidate_recall"] = round(100.0 * sum(flags) / len(flags), 2)
            click.echo(f"{'candidates recall@' + str(linker.config.candidates):<24} "
                       f"{summary['candidate_recall']:.1f}")
        click.echo(format_hits("exact-match baseline", summary["exact_match"]))
    images = linker.model.image_embedder
    if images is not None:
        encoded = images.encoder.stats
        summary["images"] = {"encoded": encoded["images"],
                             "seconds_per_encoded_image": round(encoded["seconds"] / encoded["images"], 4)
                             if encoded["images"] else None}
        if images.cache is not None:
            summary["images"]["feature_cache"] = {**images.cache.stats,
                                                  "hit_rate": round(images.cache.hit_rate, 4)}
            click.echo(images.cache.summary())
        click.echo(f"images encoded: {encoded['images']} "
                   f"({summary['images']['seconds_per_encoded_image'] or 0:.3f} s/image)")
    metrics_path = Path(out_path).with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    click.echo(f"predictions: {out_path}\nmetrics: {metrics_path}")


@cli.command("build-trie")
@click.option("--kb", "kb_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Whose tokenizer the trie is for.")
@click.option("--template", default="gemel", show_default=True,
              help="The template whose answer prefix and terminator the trie follows.")
@click.option("--terminator", default=None, help="Override the terminator text (default: the "
              "template's text after the answer, e.g. a newline).")
@click.option("--nil", is_flag=True, default=False, help="Add the reserved answer NIL (for link --nil).")
def build_trie_cmd(kb_path, out_dir, model, template, terminator, nil):
    """Tokenize the KB titles once and save the entity trie (.npy + JSON) for reuse with --trie."""
    from transformers import AutoTokenizer

    from gemel.kb import KnowledgeBase
    from gemel.linker import build_trie
    from gemel.prompting import PromptBuilder
    from gemel.sources import resolve

    kb = KnowledgeBase.from_jsonl(kb_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve(model, "llm"))
    builder = PromptBuilder(template, tokenizer)
    t0 = time.perf_counter()
    trie = build_trie(kb, tokenizer, builder.answer_prefix, terminator or builder.terminator_text,
                      nil=nil)
    trie.save(out_dir)
    merged = getattr(trie, "boundary_merged", [])
    click.echo(f"trie of {len(trie)} titles in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    if merged:
        click.echo(f"{len(merged)} title(s) merge with the answer prefix when tokenized "
                   f"(tokenized alone instead), e.g. {merged[:3]}")


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
def convert(data_path, out_mentions, out_kb, kb_from, qid2ne, qid2abs, fmt, split, splits_path,
            images_dir, limit):
    """Convert a public MEL release into gemel's mentions JSONL (and a KB JSONL)."""
    from gemel.data import convert as convert_release

    summary = convert_release(data_path, out_mentions, out_kb, fmt=fmt, split=split,
                              splits_path=splits_path, images_dir=images_dir, kb_from=kb_from,
                              qid2ne=qid2ne, qid2abs=qid2abs, limit=limit)
    click.echo(json.dumps(summary, indent=2))


@cli.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--progress/--no-progress", default=True)
def sweep(config_path, progress):
    """Run a YAML grid of prompt experiments; write results.csv/.md/.png and cells.json."""
    from gemel.eval.sweep import run_sweep

    rows = run_sweep(config_path, progress=progress)
    for r in rows:
        click.echo(" | ".join(f"{k} {v}" for k, v in r.items()))


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
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--model", default=None)
@click.option("--beams", "num_beams", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--template", default=None)
@click.option("--pool", "fusion_pool", type=int, default=None,
              help="Retrieved titles added to the candidates (beams, prior, exact matches) [16].")
@click.option("--progress/--no-progress", default=True)
@prompt_options
@data_options
def fit_fusion(kb_path, data_path, out_path, rows_paths, l2s, drop, config_path, model, num_beams,
               batch_size, template, fusion_pool, progress, train_path, train_split, demos,
               retriever, candidates, fusion, max_prompt_tokens, nil, fmt, split, splits_path,
               images_dir, limit):
    """Fit the fused ranking (LLM log-prob, retriever similarity, prior, exact title) on dev."""
    from gemel.fusion import fit_on_mentions, fit_report, rows_lists
    from gemel.runs import read_done

    if rows_paths:
        lists = [x for p in rows_paths for x in rows_lists(list(read_done(Path(p)).values()), p)]
        model_, report = fit_report(lists, l2s, drop=drop)
        rows_note = ", ".join(rows_paths)
    else:
        if not (kb_path and data_path):
            raise click.UsageError("give --kb and --data (dev mentions), or --rows to refit")
        from gemel.kb import KnowledgeBase
        from gemel.linker import Linker

        kb = KnowledgeBase.from_jsonl(kb_path)
        mentions = read_data(data_path, fmt, split, splits_path, images_dir, limit)
        train = read_train(train_path, train_split, data_path, fmt, splits_path, images_dir)
        linker = Linker.from_config(config_path, kb=kb, train=train, model=model,
                                    num_beams=num_beams, batch_size=batch_size, template=template,
                                    demos=demos, retriever=retriever, candidates=candidates,
                                    max_prompt_tokens=max_prompt_tokens, fusion_pool=fusion_pool,
                                    nil=nil)
        rows_note = str(Path(out_path).with_suffix(".dev.jsonl"))
        model_, report = fit_on_mentions(linker, mentions, rows_note, progress=progress, l2s=l2s,
                                         source=str(data_path), drop=drop)
    model_.save(out_path)
    click.echo(json.dumps(report, indent=2))
    click.echo(f"fusion model: {out_path} (dev rows: {rows_note})")


def _register_train() -> None:
    from gemel.train import train_command  # the training options live beside the training code

    cli.add_command(train_command)


_register_train()


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except GemelError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
