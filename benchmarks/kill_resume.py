"""Proof that a killed `gemel link` resumes to the same predictions (issue 9).

    python benchmarks/kill_resume.py                       # 20 kills, SmolLM2 fp32, 40 WikiDiverse test mentions
    python benchmarks/kill_resume.py --kills 5 --limit 12  # quicker

Links the mentions once without interruption, then again while sending SIGKILL at random points
(a random number of rows written plus a random delay: some kills land while the model loads, some
while a batch is computed, some while rows are written) and resuming after each, until a run
finishes. Prints how many kills landed where, and whether the two prediction files agree: the
same ids in input order, each once, the same candidates in the same order, scores within 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEMEL_DATA", REPO.parent / "shared" / "data"))


def link_cmd(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "gemel.cli", "link", "--kb", str(args.kb), "--data",
            str(args.data), "--splits", str(args.splits), "--split", args.split, "--limit",
            str(args.limit), "--out", str(out), "--model", args.model, "--dtype", args.dtype,
            "--beams", str(args.beams), "--batch-size", str(args.batch_size), "--no-progress"]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def timed_run(cmd: list[str], out: Path) -> tuple[float, float]:
    """Run to the end; return (seconds to the first row, seconds in all)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and lines(out) > 0:
            first = time.perf_counter() - t0
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n" + proc.stderr.read().decode()[-3000:])
    total = time.perf_counter() - t0
    return first or total, total


def killed_run(cmd: list[str], out: Path, at: float, startup: float) -> str | None:
    """Start the run and SIGKILL it ``at`` seconds later. Returns where the kill landed, or None
    when the run finished first."""
    before = lines(out)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    while proc.poll() is None and time.perf_counter() - t0 < at:
        time.sleep(0.005)
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n" + proc.stderr.read().decode()[-3000:])
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if lines(out) > before:
        return "while linking (after its first new batch)"
    return "while starting (imports, model, trie)" if at < startup else "while linking its first batch"


def compare(a: list[dict], b: list[dict]) -> dict:
    same_ids = [r["id"] for r in a] == [r["id"] for r in b]
    once = len({r["id"] for r in b}) == len(b)
    order = all([c["entity_id"] for c in x["candidates"]] == [c["entity_id"] for c in y["candidates"]]
                for x, y in zip(a, b))
    diff = max((abs(p["score"] - q["score"]) for x, y in zip(a, b)
                for p, q in zip(x["candidates"], y["candidates"])), default=0.0)
    return {"same_ids_in_input_order": same_ids, "each_id_once": once,
            "same_candidate_order": order, "max_score_diff": diff,
            "identical": same_ids and once and order and diff <= 1e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "wikidiverse" / "WikiDiverse.json")
    ap.add_argument("--splits", type=Path, default=DATA / "wikidiverse" / "splits.json")
    ap.add_argument("--split", default="test")
    ap.add_argument("--kb", type=Path, default=None,
                    help="KB JSONL (default: the release's gold entities, converted once)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "kill_resume")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: set GEMEL_DATA or --data")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kb is None:
        args.kb = args.out / "kb.jsonl"
        if not args.kb.exists():
            subprocess.run([sys.executable, "-m", "gemel.cli", "convert", "--data", str(args.data),
                            "--out", str(args.out / "all.jsonl"), "--kb-out", str(args.kb)],
                           check=True, stdout=subprocess.DEVNULL)
    from gemel.machine import cpu_info

    flags = sorted(cpu_info()[1] & {"avx2", "avx512_bf16", "amx_bf16"})
    print(f"cpu flags: {' '.join(flags) or '?'}; model {args.model}, dtype {args.dtype}, "
          f"{args.limit} {args.data.stem} {args.split} mentions, beams {args.beams}, "
          f"batch {args.batch_size}")
    straight, killed = args.out / "straight.jsonl", args.out / "killed.jsonl"
    for p in (straight, killed):
        for q in (p, p.with_name(p.name + ".run.json"), p.with_suffix(".metrics.json")):
            q.unlink(missing_ok=True)
    startup, total = timed_run(link_cmd(args, straight), straight)
    per_row = (total - startup) / args.limit
    print(f"uninterrupted run: {total:.1f}s ({startup:.1f}s to the first row)")

    # kill times uniform over what a fresh process would need from here: startup + the rows left
    rng = random.Random(args.seed)
    landed: dict[str, int] = {}
    kills = finished_early = cycle_kills = 0
    cycles: list[tuple[int, bool]] = []  # (kills survived, identical) per finished file
    read = lambda p: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    t0 = time.perf_counter()
    while kills < args.kills:
        left = args.limit - len({json.loads(x)["id"] for x in killed.read_text().splitlines()
                                 if x.endswith("}")}) if killed.exists() else args.limit
        at = rng.uniform(0.0, startup + max(left, args.batch_size) * per_row)
        where = killed_run(link_cmd(args, killed), killed, at, startup)
        if where is None:  # finished before its kill: check this cycle, then start over
            finished_early += 1
            cycles.append((cycle_kills, compare(read(straight), read(killed))["identical"]))
            cycle_kills = 0
            for q in (killed, killed.with_name(killed.name + ".run.json")):
                q.unlink(missing_ok=True)
            continue
        kills += 1
        cycle_kills += 1
        landed[where] = landed.get(where, 0) + 1
    proc = subprocess.run(link_cmd(args, killed), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"final resume failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    print(f"killed runs: {time.perf_counter() - t0:.1f}s for {kills} kills + the final resume "
          f"({finished_early} run(s) finished before their kill: checked, then started over)")
    a, b = read(straight), read(killed)
    result = compare(a, b)
    cycles.append((cycle_kills, result["identical"]))
    print(f"kills: {kills} ({', '.join(f'{n} {w}' for w, n in sorted(landed.items()))})")
    print(f"finished files: {len(cycles)}, kills each survived: {[k for k, _ in cycles]}, "
          f"identical to the uninterrupted run: {sum(ok for _, ok in cycles)} of {len(cycles)}")
    print(f"last file: {len(b)} rows ({len(a)} uninterrupted); {json.dumps(result)}")
    identical = all(ok for _, ok in cycles)
    print("IDENTICAL" if identical else "DIFFERENT")
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
