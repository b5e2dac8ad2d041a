"""Files are sacred, flags are checked at the edge, exit codes say how a run ended, shards merge
into one run, and a killed run resumes to the same predictions (issue 9)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemel.cli import main
from tests.conftest import REPO
from tests.test_cli import tiny_model_dir  # noqa: F401  (a fixture)

KB = REPO / "examples" / "kb.jsonl"
MENTIONS = REPO / "examples" / "mentions.jsonl"


def gemel(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the `gemel` entry point in this process: (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["gemel", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def link_args(out, model, *extra):
    """fp32: scores compared across runs must not carry bf16's rounding (auto picks bf16 on
    CPUs with AVX512-BF16, and batch composition then moves scores by ~1e-3)."""
    return ["link", "--kb", KB, "--data", MENTIONS, "--out", out, "--model", model,
            "--no-progress", "--dtype", "fp32", *extra]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_out_naming_another_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                            tiny_model_dir):
    out = tmp_path / "kb_copy.jsonl"
    shutil.copy(KB, out)
    code, text = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2"))
    assert code == 2 and str(out) in text and "not a gemel predictions file" in text
    assert out.read_bytes() == KB.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb_copy.jsonl"]


@pytest.mark.parametrize("flag", ["--beams", "--top-k", "--batch-size"])
def test_zero_is_a_usage_error_and_touches_nothing(tmp_path, monkeypatch, capsys, flag):
    out = tmp_path / "pred.jsonl"
    out.write_text("precious\n")
    # the model name is never resolved: the flags are checked first
    code, text = gemel(monkeypatch, capsys, *link_args(out, "no-such-model", flag, "0"))
    assert code == 2 and flag in text and "Traceback" not in text
    assert out.read_text() == "precious\n" and len(list(tmp_path.iterdir())) == 1


def test_top_k_above_beams_is_refused_and_the_default_follows_beams(tmp_path, monkeypatch, capsys,
                                                                   tiny_model_dir):
    out = tmp_path / "pred.jsonl"
    code, text = gemel(monkeypatch, capsys,
                       *link_args(out, tiny_model_dir, "--beams", "2", "--top-k", "5"))
    assert code == 2 and "top_k=5 is more than num_beams=2" in text and not out.exists()
    code, text = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2"))
    assert code == 0, text
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    # the summary states how many candidates the run listed, next to its H@k
    assert metrics["gemel"]["max_candidates"] <= 2 and metrics["gemel"]["H@1"] is not None
    side = json.loads(out.with_name(out.name + ".run.json").read_text())
    assert side["identity"]["settings"]["top_k"] == 2
    # what made the run, defaults included, for reports: the model and the dtype it resolved to
    assert side["about"]["model"] == str(tiny_model_dir) and side["about"]["dtype"] == "float32"
    assert side["about"]["backend"] == "hf" and side["about"]["template"]
    assert all(len(r["candidates"]) <= 2 for r in rows_of(out))


def test_a_config_file_out_of_range_names_the_file_and_field(tmp_path, monkeypatch, capsys):
    config = tmp_path / "linker.yaml"
    config.write_text("num_beams: 0\n")
    code, text = gemel(monkeypatch, capsys, *link_args(tmp_path / "p.jsonl", "m", "--config",
                                                       config))
    assert code == 2 and str(config) in text and "num_beams" in text


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys, tiny_model_dir):
    out = tmp_path / "pred.jsonl"
    assert gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2",
                                                 "--limit", "4"))[0] == 0
    before = out.read_text()
    code, text = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "3"))
    assert code == 2 and "num_beams: 2 in the file, 3 now" in text and out.read_text() == before
    # the same settings, a wider limit: resumes, keeping the first 4 rows
    code, _ = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2"))
    assert code == 0 and out.read_text().startswith(before) and len(rows_of(out)) == 16


def test_error_rows_end_with_a_summary_and_exit_code_3(tmp_path, monkeypatch, capsys,
                                                       tiny_model_dir):
    from gemel.errors import DataError
    from gemel.linker import Linker

    real = Linker.link_batch

    def failing(self, mentions, *args, **kwargs):
        if any(m.id == "2-0" for m in mentions):
            raise DataError("image is not a picture", path="x.jpg", field="image")
        return real(self, mentions, *args, **kwargs)

    monkeypatch.setattr(Linker, "link_batch", failing)
    out = tmp_path / "pred.jsonl"
    code, text = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2"))
    assert code == 3, text
    assert "1 of 16 mentions ended as error rows" in text and "2-0: DataError" in text
    assert [r["id"] for r in rows_of(out) if r["error"]] == ["2-0"]
    monkeypatch.setattr(Linker, "link_batch", real)  # fixed: the rerun links it, exit 0
    code, text = gemel(monkeypatch, capsys, *link_args(out, tiny_model_dir, "--beams", "2"))
    assert code == 0 and not any(r["error"] for r in rows_of(out))


def test_two_shards_merged_equal_one_run(tmp_path, monkeypatch, capsys, tiny_model_dir):
    one = tmp_path / "one.jsonl"
    assert gemel(monkeypatch, capsys, *link_args(one, tiny_model_dir, "--beams", "3"))[0] == 0
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        code, text = gemel(monkeypatch, capsys, *link_args(part, tiny_model_dir, "--beams", "3",
                                                           "--shard", f"{i}/2"))
        assert code == 0, text
    assert 0 < len(rows_of(parts[0])) < 16 and len(rows_of(parts[0]) + rows_of(parts[1])) == 16
    merged = tmp_path / "merged.jsonl"
    code, text = gemel(monkeypatch, capsys, "merge", *parts, "--data", MENTIONS, "--out", merged)
    assert code == 0, text
    assert [r["id"] for r in rows_of(merged)] == [r["id"] for r in rows_of(one)]
    for a, b in zip(rows_of(merged), rows_of(one)):
        assert [c["entity_id"] for c in a["candidates"]] == [c["entity_id"] for c in b["candidates"]]
        assert all(abs(x["score"] - y["score"]) < 1e-4
                   for x, y in zip(a["candidates"], b["candidates"]))
    # the merged file is the unsharded run's own: `gemel link` resumes it (nothing left to do)
    assert gemel(monkeypatch, capsys, *link_args(merged, tiny_model_dir, "--beams", "3"))[0] == 0
    code, text = gemel(monkeypatch, capsys, "merge", parts[0], "--data", MENTIONS, "--out",
                       tmp_path / "gap.jsonl")
    assert code == 2 and "in no part" in text and not (tmp_path / "gap.jsonl").exists()
    code, text = gemel(monkeypatch, capsys, *link_args(tmp_path / "x.jsonl", tiny_model_dir,
                                                       "--shard", "2/2"))
    assert code == 2 and "0 <= i < n" in text


def test_fit_fusion_takes_the_linker_flags_and_no_fusion(monkeypatch, capsys, tmp_path):
    code, text = gemel(monkeypatch, capsys, "fit-fusion", "--help")
    for flag in ("--top-k", "--dtype", "--device", "--trie", "--length-penalty", "--mapper",
                 "--no-image", "--feature-cache"):
        assert flag in text
    code, text = gemel(monkeypatch, capsys, "fit-fusion", "--kb", KB, "--data", MENTIONS,
                       "--out", tmp_path / "f.json", "--fusion", KB)
    assert code == 2 and "No such option '--fusion'" in text
    code, text = gemel(monkeypatch, capsys, "fit-fusion", "--kb", KB, "--data", MENTIONS,
                       "--out", KB, "--beams", "2")
    assert code == 2 and "not a fusion model" in text


def test_train_never_overwrites_a_run_without_resume(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    (ckpt / "last").mkdir(parents=True)
    (ckpt / "last" / "mapper.safetensors").write_bytes(b"weights")
    code, text = gemel(monkeypatch, capsys, "train", "--kb", KB, "--data", MENTIONS, "--out", ckpt,
                       "--cpu")
    assert code == 2 and "--resume" in text and "already holds a training run" in text
    assert (ckpt / "last" / "mapper.safetensors").read_bytes() == b"weights"
    code, text = gemel(monkeypatch, capsys, "train", "--kb", KB, "--data", MENTIONS, "--out",
                       tmp_path / "new", "--batch-size", "0")
    assert code == 2 and "--batch-size" in text and not (tmp_path / "new").exists()


# -- kill -9 -------------------------------------------------------------------------------------
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _kill_after(cmd, watch: Path, lines: int, deadline: float = 900.0) -> bool:
    """Start ``cmd``; SIGKILL it once ``watch`` has at least ``lines`` lines. False if it
    finished first. ``deadline``: a safety net for a hung child only, far above a run's time on
    a loaded 2-core machine (a tight one killed slow but healthy runs: a flaky failure)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=REPO, start_new_session=True)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < deadline:
            if watch.exists() and watch.read_bytes().count(b"\n") >= lines:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


def test_kill_9_of_link_then_resume_gives_the_same_predictions(tmp_path, monkeypatch, capsys,
                                                                tiny_model_dir):
    """A few SIGKILLs at random points of `gemel link` (batch 1: one fsync'd append per
    mention), each followed by a resume: the final file equals an uninterrupted run's."""
    mentions = tmp_path / "mentions.jsonl"
    base = [json.loads(x) for x in MENTIONS.read_text().splitlines()]
    mentions.write_text("".join(json.dumps(dict(m, id=f"{m['id']}-{r}")) + "\n"
                                for r in range(3) for m in base))  # 48 mentions
    args = lambda out: [sys.executable, "-m", "gemel.cli", "link", "--kb", str(KB), "--data",
                        str(mentions), "--out", str(out), "--model", str(tiny_model_dir),
                        "--beams", "3", "--batch-size", "2", "--dtype", "fp32", "--no-progress"]
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    assert gemel(monkeypatch, capsys, *args(straight)[3:])[0] == 0  # in this process: quicker
    rng = random.Random(9)
    kills = 0
    for threshold in sorted(rng.sample(range(1, 46), 3)):
        kills += _kill_after(args(killed), killed, threshold)
    assert gemel(monkeypatch, capsys, *args(killed)[3:])[0] == 0
    assert kills >= 2
    a, b = rows_of(straight), rows_of(killed)
    assert [r["id"] for r in a] == [r["id"] for r in b] == [json.loads(x)["id"] for x in
                                                             mentions.read_text().splitlines()]
    for x, y in zip(a, b):
        assert [c["entity_id"] for c in x["candidates"]] == [c["entity_id"] for c in y["candidates"]]
        assert all(abs(p["score"] - q["score"]) <= 1e-4
                   for p, q in zip(x["candidates"], y["candidates"]))


def test_kill_9_of_train_then_resume_continues_at_the_step(tmp_path):
    """SIGKILL a training run after its checkpoint at some step; --resume continues from that
    step, and the final mapper equals an uninterrupted run's."""
    from safetensors.torch import load_file
    import torch

    script = REPO / "tests" / "kill_train_script.py"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = lambda out, *extra: [sys.executable, str(script), str(out), *extra]
    from tests.kill_train_script import main as train_main

    train_main(straight, resume=False)  # in this process: quicker
    state = killed / "ckpt" / "last" / "trainer_state.json"
    proc = subprocess.Popen(run(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
    t0, step = time.monotonic(), 0
    try:
        while proc.poll() is None and time.monotonic() - t0 < 900:  # a hung child's safety net
            try:
                step = json.loads(state.read_text())["step"]
            except (OSError, ValueError, KeyError):
                step = 0
            if step >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run(run(killed, "--resume"), env=_env(), check=True, cwd=REPO,
                   capture_output=True, timeout=900)
    summary = json.loads((killed / "ckpt" / "summary.json").read_text())
    final = json.loads((straight / "ckpt" / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 3 and summary["steps"] == final["steps"]
    a = load_file(str(straight / "ckpt" / "last" / "mapper.safetensors"))
    b = load_file(str(killed / "ckpt" / "last" / "mapper.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (killed / "ckpt" / "train_log.jsonl").read_text()
             .splitlines() if json.loads(x)["event"] == "step"]
    assert steps == sorted(set(steps))  # every logged step once


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_link_shards_by_rank_and_rank_0_writes_one_out(tmp_path, monkeypatch, capsys,
                                                                tiny_model_dir):
    out = tmp_path / "pred.jsonl"
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "gemel.cli",
           "link", "--kb", str(KB), "--data", str(MENTIONS), "--out", str(out), "--model",
           str(tiny_model_dir), "--beams", "3", "--no-progress", "--device", "cpu", "--dtype",
           "fp32"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 300 s:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    parts = [tmp_path / f"pred.shard-{r}-of-2.jsonl" for r in range(2)]
    ids = [{r["id"] for r in rows_of(p)} for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    one = tmp_path / "one.jsonl"
    assert gemel(monkeypatch, capsys, *link_args(one, tiny_model_dir, "--beams", "3"))[0] == 0
    assert [r["id"] for r in rows_of(out)] == [r["id"] for r in rows_of(one)]
    for a, b in zip(rows_of(out), rows_of(one)):
        assert [c["entity_id"] for c in a["candidates"]] == [c["entity_id"] for c in b["candidates"]]
