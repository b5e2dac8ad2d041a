"""Bad inputs through the `gemel` CLI: each names file, line and field, and exits as documented.

The cases live in tests/bad_inputs.py (benchmarks/bad_inputs_table.py prints them as a table);
the fuzz tests below check the readers, the KB loader and the trie on random input.
"""
from __future__ import annotations

import pytest

from tests.bad_inputs import RUNNABLE, build_env, run_case


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("bad-inputs-env"))


def test_the_table_is_long_enough():
    assert len(RUNNABLE) >= 30
    assert len({c.id for c in RUNNABLE}) == len(RUNNABLE)


@pytest.mark.parametrize("case", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_bad_input(case, env, tmp_path):
    code, text = run_case(case, env, tmp_path / case.id)
    assert "Traceback" not in text and "TRACEBACK" not in text, text
    for fragment in case.expect:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    assert code == case.exit_code, text
