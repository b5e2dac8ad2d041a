"""Print the bad-input table (Markdown): every case of tests/bad_inputs.py run through the `gemel`
CLI with tiny random models, with the message and exit code gemel actually gave.

    python benchmarks/bad_inputs_table.py > bad_inputs.md

The same case list is asserted by tests/test_bad_inputs.py; a row whose result differs from the
case's expectation is marked "MISMATCH".
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub here


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GEMEL_CACHE"] = str(Path(tmp) / "cache")
        from tests.bad_inputs import CASES, build_env, message_line, run_case

        env = build_env(Path(tmp) / "env")
        print("| # | input | message | exit code |")
        print("|---|---|---|---|")
        for n, case in enumerate(CASES, 1):
            if case.make is None:
                print(f"| {n} | {case.input} | {case.expect[0]} | {case.exit_code} |")
                continue
            code, text = run_case(case, env, Path(tmp) / "cases" / case.id)
            message = message_line(case, text).replace(tmp, "…").replace("|", "\\|")
            ok = code == case.exit_code and all(f in text for f in case.expect)
            print(f"| {n} | {case.input} | {message[:300]}{'…' if len(message) > 300 else ''} "
                  f"| {code}{'' if ok else ' MISMATCH'} |")


if __name__ == "__main__":
    main()
