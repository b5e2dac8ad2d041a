"""Metrics, summaries, baselines, sweeps and reports over prediction files (installed as
``gemel.eval``). It sits above the core: the linker and everything it imports never import it
(docs/architecture.md, "Modules, by floor"; tests/test_house.py checks it)."""
