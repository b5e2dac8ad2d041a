"""LLM backends behind one interface (:class:`gemel.backends.base.Backend`), chosen by name
(``hf`` | ``vllm``) and imported only when named (``base.get_backend``). Their contract and how to
add one: docs/architecture.md ("Where to add": a backend)."""
