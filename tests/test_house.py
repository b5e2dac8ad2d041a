"""The house rules of docs/architecture.md, read from the source with ast (nothing is imported).

* The linker and everything it imports never import ``gemel.eval``: metrics, baselines and reports
  sit above the core (training, the CLI, the demo and benchmarks may use them).
* No function in gemel/, retrieval/ or eval/ is longer than 80 lines unless it says why in a
  ``# long:`` comment near its top.
* The floors of docs/architecture.md's module table hold: imports go down or sideways, never up.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# installed names of the source folders (pyproject's package-dir)
FOLDERS = {"gemel": "gemel", "retrieval": "gemel.retrieval", "eval": "gemel.eval"}
MAX_LINES = 80
# Modules above the core that may import gemel.eval: the `gemel` command, mapper training, the
# fusion model's fitting (it reports generation's H@1 with eval's metric) and the demo.
MAY_IMPORT_EVAL = {"gemel.cli", "gemel.train", "gemel.fusion", "gemel.demo"}


def sources() -> dict[str, Path]:
    """Installed module name -> file, for every module of the three folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere in its file (function bodies
    included), the packages on their way, and modules named by a string constant (registries
    that ``importlib.import_module`` a name, e.g. the backends)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.partition(":")[0])  # a module name, or "module:attribute"
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return (out & known) - {module}


def import_graph() -> dict[str, set[str]]:
    files = sources()
    return {m: imported(m, p, set(files)) for m, p in files.items()}


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_import_graph_sees_lazy_and_registry_imports():
    """The checks below would pass vacuously if the graph missed imports."""
    graph = import_graph()
    assert "gemel.eval.baselines" in graph["gemel.cli"]  # inside a function
    assert "gemel.backends.hf" in graph["gemel.backends.base"]  # a registry string
    assert "gemel.rerank" in reached(graph, "gemel.linker")


def test_the_linker_never_imports_eval():
    graph = import_graph()
    below = reached(graph, "gemel.linker")
    assert not {m for m in below if m.startswith("gemel.eval")}, \
        {m: sorted(x for x in graph[m] if x.startswith("gemel.eval")) for m in below
         if any(x.startswith("gemel.eval") for x in graph[m])}


def test_only_the_layers_above_the_core_import_eval():
    graph = import_graph()
    importers = {m for m, deps in graph.items() if not m.startswith("gemel.eval")
                 and any(d.startswith("gemel.eval") for d in deps)}
    allowed = {m for m in importers
               if any(m == a or m.startswith(a + ".") for a in MAY_IMPORT_EVAL)}
    assert importers == allowed, sorted(importers - allowed)


def long_functions() -> list[tuple[str, str, int]]:
    """(file, function, lines) of every function over MAX_LINES without a ``# long:`` reason in
    its signature or first lines."""
    out = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                size = node.end_lineno - node.lineno + 1
                head = lines[node.lineno - 1:node.body[0].end_lineno + 3]
                if size > MAX_LINES and not any("# long:" in line for line in head):
                    out.append((path.relative_to(REPO).as_posix(), node.name, size))
    return out


def test_functions_are_short_or_say_why():
    found = long_functions()
    assert not found, f"shorten these, or state why at their top in a '# long:' comment: {found}"


def test_the_length_check_can_fail(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    (tmp_path / "gemel").mkdir()
    (tmp_path / "gemel" / "big.py").write_text(f"def big():\n{body}\n\n\ndef why():\n"
                                               f"    # long: one table, read top to bottom\n{body}\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    monkeypatch.setitem(globals(), "FOLDERS", {"gemel": "gemel"})
    assert long_functions() == [("gemel/big.py", "big", MAX_LINES + 2)]


def doc_floors() -> dict[str, int]:
    """Module (or package) -> floor, from the table in docs/architecture.md. A cell lists paths
    in backticks; a bare file name is in the folder of the path before it."""
    floors, folder = {}, "gemel/"
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for line in text.split("## Modules, by floor")[1].split("\n## ")[0].splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().isdigit():
            continue
        for path in cells[2].split("`")[1::2]:
            if not path.endswith((".py", "/", "/*")):  # prompts/*.txt, gemel.eval, ...
                continue
            if "/" in path.rstrip("/*"):
                folder = path.rsplit("/", 1)[0] + "/"
            else:
                path = path if path.rstrip("/*") in FOLDERS else folder + path
            top, _, rest = path.rstrip("/*").removesuffix(".py").partition("/")
            name = FOLDERS[top] + ("." + rest.replace("/", ".") if rest else "")
            floors[name] = int(cells[1])
    return floors


def test_modules_import_only_their_floor_or_below():
    """docs/architecture.md's floors hold: every module has one, and none imports upwards."""
    floors = doc_floors()

    def floor(module: str) -> int | None:
        inside = [f for m, f in floors.items() if m.startswith(module + ".")]
        if module not in floors and inside:  # a package listed by its modules
            return min(inside)
        while module not in floors and "." in module:
            module = module.rpartition(".")[0]
        return floors.get(module)

    graph = import_graph()
    missing = sorted(m for m in graph if m != "gemel" and floor(m) is None)
    assert not missing, f"modules without a floor in docs/architecture.md: {missing}"
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if m != "gemel" and d != "gemel" and floor(d) > floor(m))
    assert not upward, f"imports up the floors: {upward}"


def test_the_module_table_lists_only_modules_that_exist():
    """docs/architecture.md's table names no module or package that is gone (the test above
    checks the other way: every module has a floor)."""
    modules = set(sources())
    listed = doc_floors()
    assert len(listed) > 20, sorted(listed)  # the table was read
    gone = sorted(m for m in listed
                  if m not in modules and not any(x.startswith(m + ".") for x in modules))
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"
