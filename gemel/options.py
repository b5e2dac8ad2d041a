"""The command-line flags, each defined once: a flag means the same thing in every command.

``gemel link``, ``fit-fusion``, ``train`` and ``sweep`` compose their options from the decorators
below. Ranges are checked here, while the command line is parsed (``--beams 0`` is a usage error,
exit code 2, before any file is opened), and again in the configs (a YAML file cannot sneak a 0 in).
"""
from __future__ import annotations

import click

from gemel.config import DTYPES
from gemel.retrieval.registry import retriever_names
from gemel.visual_prompt import MODES as VP_MODES

DATA_FORMATS = ["auto", "native", "wikidiverse", "wikimel", "mimic", "vpwiki"]
MIXED_PRECISIONS = ["auto", "no", "bf16", "fp16"]
AT_LEAST_1 = click.IntRange(min=1)
AT_LEAST_0 = click.IntRange(min=0)


def compose(*decorators):
    """Several option decorators as one (applied so that --help lists them in the given order)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


# -- one flag each ---------------------------------------------------------------------------
def config_option(what: str):
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                        default=None, help=f"A YAML {what}; flags win over it.")


model_option = click.option(
    "--model", default=None, help="LLM: offline name, folder, .gguf or hub id "
    "[smollm2-135m-instruct].")
template_option = click.option(
    "--template", default=None, help="Prompt template name or .txt path [the model's, see `gemel models`; else gemel].")
beams_option = click.option(
    "--beams", "num_beams", type=AT_LEAST_1, default=None, help="Beam size (>= 1) [5].")
top_k_option = click.option(
    "--top-k", type=AT_LEAST_1, default=None,
    help="Candidates per mention (1 .. --beams; more only with --fusion) [min(5, --beams)].")
batch_size_option = click.option(
    "--batch-size", type=AT_LEAST_1, default=None,
    help="Mentions per forward pass, per process (>= 1) [link 4, train 8].")
dtype_option = click.option(
    "--dtype", type=click.Choice(DTYPES), default=None,
    help="Weights of the frozen LLM [auto: bf16 where fast, else fp32].")
device_option = click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [auto].")
backend_option = click.option(
    "--backend", default=None, type=click.Choice(["hf", "vllm"]),
    help="Model runtime: hf (transformers) or vllm (optional extra, see README) [hf].")
trie_option = click.option(
    "--trie", default=None, type=click.Path(exists=True, file_okay=False),
    help="A trie saved by `gemel build-trie` (default: built once and cached).")
length_penalty_option = click.option(
    "--length-penalty", type=click.FloatRange(min=0.0), default=None,
    help="Rank by logprob / len**p (>= 0; default 0: raw sequence log-probability).")
progress_option = click.option("--progress/--no-progress", default=True,
                               help="Show a progress bar.")
mapper_option = click.option(
    "--mapper", type=click.Path(exists=True, file_okay=False), default=None,
    help="A mapper checkpoint from `gemel train`: images become soft tokens.")
no_image_option = click.option("--no-image", is_flag=True, default=None,
                               help="Ablation: with --mapper, link text-only.")
feature_cache_option = click.option(
    "--feature-cache", default=None,
    help="Folder of cached vision features ('none': memory only) [gemel cache/features].")
fusion_option = click.option(
    "--fusion", type=click.Path(exists=True, dir_okay=False), default=None,
    help="A fusion model from `gemel fit-fusion`: rerank beams + retrieved.")

format_option = click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), default=None,
                             help="Shape of --data [auto].")
split_option = click.option("--split", default=None,
                            help="Split to read (train/val/dev/test), with --splits.")
splits_option = click.option("--splits", "splits_path", type=click.Path(exists=True, dir_okay=False),
                             default=None, help="splits.json selecting record ids per split.")
images_option = click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
                             default=None, help="Folder of the release's images.")
limit_option = click.option("--limit", type=AT_LEAST_1, default=None,
                            help="Only the first N mentions.")
strict_option = click.option(
    "--strict", is_flag=True, default=False,
    help="Any bad record is an error (default: bad KB and training records are skipped and "
    "reported, bad mentions to link become error rows).")


class ShardType(click.ParamType):
    """``i/n``: shard i (0-based) of n."""

    name = "i/n"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            i, n = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not i/n (e.g. 0/4: the first of 4 shards)", param, ctx)
        if n < 1 or not 0 <= i < n:
            self.fail(f"{value!r}: need 0 <= i < n (shards are numbered from 0)", param, ctx)
        return i, n


shard_option = click.option(
    "--shard", type=ShardType(), default=None,
    help="Link only shard i of n (0-based; split by a stable hash of the mention id); "
    "join the parts with `gemel merge`.")


# -- groups of flags -------------------------------------------------------------------------
data_options = compose(format_option, split_option, splits_option, images_option, limit_option)
data_options.__doc__ = "Options shared by every command that reads mentions."

prompt_options = compose(
    click.option("--train", "train_path", type=click.Path(exists=True, dir_okay=False),
                 default=None, help="Training mentions (demonstrations, prior); a release "
                 "file works with --train-split."),
    click.option("--train-split", default=None,
                 help="Take the training mentions from this split of --data (with --splits)."),
    click.option("--demos", type=AT_LEAST_0, default=None,
                 help="Demonstrations per prompt [0]."),
    click.option("--retriever", type=click.Choice(retriever_names()), default=None,
                 help="Demonstration retriever [simcse: nearest training mentions by "
                 "sentence-embedding cosine, with MiniLM]."),
    click.option("--candidates", "num_candidates", type=AT_LEAST_0, default=None,
                 help="Restrict decoding to the top-C retrieved KB titles per mention."),
    click.option("--max-prompt-tokens", type=AT_LEAST_1, default=None,
                 help="Token budget: drop the least similar demonstrations first."),
    click.option("--nil", is_flag=True, default=None,
                 help="Allow the answer NIL (entity not in the KB; entity_id null in the "
                 "output); NIL training mentions become demonstrations."),
)
prompt_options.__doc__ = "Demonstrations, candidates, NIL: shared by `link` and `fit-fusion`."

linker_options = compose(
    config_option("LinkerConfig"), model_option, beams_option, top_k_option, batch_size_option,
    template_option, dtype_option, device_option, trie_option, length_penalty_option,
    progress_option, mapper_option, no_image_option, feature_cache_option)
linker_options.__doc__ = "How a Linker is built: shared by `link` and `fit-fusion`."

training_options = compose(
    config_option("TrainConfig"), model_option,
    click.option("--vision", default=None, help="Vision encoder [dinov2-small]."),
    click.option("--feature", default=None,
                 help="pooled | cls | mean | layers:4,10,11,12 [pooled]."),
    click.option("--layout", default=None,
                 help="Feature layout: global | grid:N | region | region:L (patch tokens of "
                      "hidden state L) [auto: region:-4 for overlay modes, else global]."),
    click.option("--n-visual-tokens", type=AT_LEAST_1, default=None,
                 help="Soft tokens per image [4]."),
    click.option("--vp-mode", type=click.Choice(VP_MODES), default=None,
                 help="Visual prompt [none]."),
    template_option,
    click.option("--epochs", type=AT_LEAST_1, default=None),
    click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
                 help="Peak learning rate [1e-3]."),
    batch_size_option,
    click.option("--grad-accum", type=AT_LEAST_1, default=None),
    click.option("--warmup", type=click.FloatRange(min=0.0), default=None,
                 help="Fraction (<1) or number of steps."),
    click.option("--eval-every", type=AT_LEAST_0, default=None,
                 help="Optimizer steps; 0: every epoch."),
    click.option("--max-steps", type=AT_LEAST_1, default=None),
    click.option("--seed", type=int, default=None),
    click.option("--resume", is_flag=True, default=False, help="Continue from OUT/last."),
    click.option("--lora-r", type=AT_LEAST_0, default=None,
                 help="Also train LoRA adapters of this rank."),
    click.option("--mixed-precision", type=click.Choice(MIXED_PRECISIONS), default=None),
    dtype_option, beams_option, feature_cache_option,
    click.option("--cpu", is_flag=True, default=False, help="Train on CPU even with a GPU."),
    click.option("--log-with", type=click.Choice(["tensorboard"]), default=None),
    format_option, strict_option, split_option,
    click.option("--dev-split", default=None, help="Dev split, with --splits."),
    splits_option, images_option, limit_option,
    click.option("--dev-limit", type=AT_LEAST_1, default=None),
)
training_options.__doc__ = "How `gemel train` trains a mapper (the fields of gemel.train.TrainConfig)."

LINKER_FLAGS = ("config_path", "model", "num_beams", "top_k", "batch_size", "template", "dtype",
                "device", "trie", "length_penalty", "progress", "mapper", "no_image",
                "feature_cache")


# -- reading what the flags name -----------------------------------------------------------------
def echo_err(text: str) -> None:
    click.echo(text, err=True)


def read_data(path, fmt, split, splits_path, images_dir, limit, strict=False):
    """The mentions to link: a bad record becomes an error row (``strict``: an error)."""
    from gemel.data.inputs import load_mentions

    return load_mentions(path, fmt or "auto", split, splits_path, images_dir, limit,
                         role="link", strict=strict, echo=echo_err)


def read_train(train_path, train_split, data_path, fmt, splits_path, images_dir, strict=False):
    """The demonstration pool: bad records skipped and reported (``strict``: an error)."""
    from gemel.data.inputs import load_mentions

    if train_path:
        return load_mentions(train_path, "auto", train_split, splits_path, images_dir,
                             role="pool", strict=strict, echo=echo_err)
    if train_split:
        return load_mentions(data_path, fmt or "auto", train_split, splits_path, images_dir,
                             role="pool", strict=strict, echo=echo_err)
    return None


def read_kb(kb_path, strict=False):
    """The KB: bad records skipped and reported (``strict``: an error); an empty KB an error."""
    from gemel.data.inputs import load_kb

    return load_kb(kb_path, strict, echo=echo_err)


__all__ = ["data_options", "prompt_options", "linker_options", "training_options", "shard_option",
           "strict_option", "read_data", "read_kb", "read_train", "echo_err", "compose",
           "backend_option", "DATA_FORMATS", "DTYPES", "MIXED_PRECISIONS"]
