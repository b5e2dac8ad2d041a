"""gemel: generative multimodal entity linking.

The one entry point is :class:`gemel.linker.Linker`; it is imported lazily so that
``import gemel`` stays cheap for the data and trie tools. docs/architecture.md walks one mention
from files to its prediction row, lists the modules by floor, and says where to add a backend,
a retriever, a template, a reader or a fusion feature.
"""
from gemel.types import Candidate, Entity, LinkResult, Mention

__all__ = ["Candidate", "Entity", "LinkResult", "Mention", "Linker"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Linker":
        from gemel.linker import Linker

        return Linker
    raise AttributeError(name)
