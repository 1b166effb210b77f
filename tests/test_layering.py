"""The layering of docs/design.md, enforced: every import in ``src/peftlab`` (lazy imports inside
functions included) is parsed, resolved to the file it loads, and checked against the rules below;
and no two files import each other, directly or through a chain (an import circle).

``python tests/test_layering.py`` prints the graph's floors and every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "peftlab"

# (importer room, imported room): forbidden edges. A "room" is the first component below peftlab
# (``methods``, ``train``, ...); top-level files are rooms of their own (``registry``, ``config``).
HIGH = {"train", "export", "serve", "lab", "eval", "board", "commands", "api", "cli", "configure", "rundir"}
FORBIDDEN: dict[str, set[str]] = {
    "methods": HIGH | {"data"},
    "data": HIGH | {"methods"},
    "model": HIGH | {"methods", "data"},
    "quant": HIGH | {"methods", "data"},
    "train": {"commands", "lab", "serve", "eval", "board", "api", "cli"},
    "serve": {"train", "lab", "board", "commands", "api", "cli"},
    "eval": {"lab", "commands", "serve", "board", "api", "cli"},
    "export": {"train", "eval", "lab", "serve", "board", "commands", "api", "cli"},
    "lab": {"commands", "serve", "board", "api", "cli"},
    # the board stands on lab and serve: it launches training as a subprocess, never the loop in-process
    "board": {"train", "commands", "api", "cli"},
    "registry": HIGH | {"data", "config"},
    "config": HIGH | {"methods", "registry", "data", "model", "quant"},
    "configure": HIGH - {"configure"} | {"data", "model", "quant"},
    "rundir": HIGH - {"configure", "rundir"} | {"methods", "data", "model", "quant"},
    "validate": HIGH | {"config", "registry", "methods", "data", "model", "quant"},
    "ds_config": HIGH | {"config", "registry", "methods", "data", "model", "quant", "validate"},
    "errors": {"*"},
    "version": {"*"},
    "io": {"*"},
}
# Files that may import anything: the entry points above every room.
TOP = {"commands", "cli", "api", "__main__", "__init__"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    child = node
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return child in node.body  # the else branch runs
        child = node
    return False


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every runtime import in the file, resolved to package modules.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``; importing
    ``a.b`` also runs the ``__init__`` of ``a`` (counted: that is how a light module drags in a heavy
    one through its package)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            if not (t == PKG or t.startswith(PKG + ".")):
                continue
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            parts = t.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way run their __init__
                found.append((".".join(parts[:i]), node.lineno))
    return [(t, line) for t, line in found if t != name]


def graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {name: dict(imports_of(name, path, modules)) for name, path in modules.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(g: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for src, targets in g.items():
        r = room(src)
        if r in TOP or src == PKG:
            continue
        rules = FORBIDDEN.get(r, set())
        for dst, line in targets.items():
            d = room(dst)
            if d == r:
                continue
            if dst == PKG:  # every import runs the package's __init__, which is lazy (tested below)
                continue
            if d == "commands" or "*" in rules or d in rules:
                bad.append(f"{src} (line {line}) imports {dst}: {r} must not import {d}")
    return sorted(bad)


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan), each a circle of imports.
    A package's ``__init__`` is a file like the others (importing ``a.b`` runs ``a/__init__`` first,
    so code there that imports back is a real circle); only the lazy root package is left out."""
    files = {k: {d for d in v if d in g and d != PKG} for k, v in g.items() if k != PKG}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in files[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(files):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_forbidden_import():
    bad = violations(graph())
    assert not bad, "forbidden imports (docs/design.md, 'Import rules'):\n" + "\n".join(bad)


def test_no_import_circle():
    circles = cycles(graph())
    assert not circles, "import circles between files:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_package_init_is_lazy():
    """``import peftlab.anything`` runs ``peftlab/__init__.py`` first; it imports nothing of the
    package at module level (the API loads on first attribute access), so a light module never
    drags in the training loop through it."""
    init = SRC / PKG / "__init__.py"
    eager = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.parse(init.read_text()).body
             if isinstance(n, (ast.Import, ast.ImportFrom)) and (getattr(n, "level", 0) or
                                                                 (getattr(n, "module", "") or "").startswith(PKG))]
    assert not eager, f"{init} imports at module level: {eager}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a lazy relative import inside a function, planted in a copy of a
    method file, is found as methods -> train; a planted pair of files importing each other is a
    circle."""
    modules = module_files()
    path = tmp_path / "lora.py"
    path.write_text("def f():\n    from ..train import loop\n    return loop\n")
    found = dict(imports_of("peftlab.methods.lora", path, modules))
    assert "peftlab.train.loop" in found and "peftlab.train" in found
    assert violations({"peftlab.methods.lora": found})
    g = {"peftlab.data.a": {"peftlab.data.b": 1}, "peftlab.data.b": {"peftlab.data.a": 3}}
    assert cycles(g) == [["peftlab.data.a", "peftlab.data.b"]]


def test_serving_does_not_load_the_training_loop():
    """What the rules are for: importing the server's modules pulls in no training code (checked
    in a fresh interpreter, so nothing this test process imported earlier counts)."""
    import subprocess

    code = ("import sys; import peftlab.serve.multi_lora, peftlab.serve.engine, peftlab.serve.store, "
            "peftlab.serve.loading, peftlab.serve.server; "
            "bad = sorted(m for m in sys.modules if m.startswith(('peftlab.train', 'peftlab.lab', "
            "'peftlab.commands'))); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent)
    assert r.returncode == 0, f"serving imports training/lab/commands modules: {r.stdout} {r.stderr[-2000:]}"


if __name__ == "__main__":
    g = graph()
    print("\n".join(violations(g)) or "no forbidden imports")
    print("\n".join(" <-> ".join(c) for c in cycles(g)) or "no circles")
    pytest.main([__file__, "-q"])
