"""The package's architecture, checked: every import inside tokenmorph points to its own layer or
   one
below, packages of one layer do not import each other, and no two modules import each other,
directly or through others (function-level imports included: a lazy import is still a
dependency)."""

import ast
from pathlib import Path

import tokenmorph

ROOT = Path(tokenmorph.__file__).parent

# package or module -> layer; a module belongs to the longest prefix listed
LAYERS = {
    "tokenmorph": 0,
    "tokenmorph.errors": 0,
    "tokenmorph.ops": 1,
    # the public names of tokenmorph.ops.*: above ops, below everything else
    "tokenmorph.morph": 1.5,
    "tokenmorph.losses": 1.5,
    "tokenmorph.masking": 1.5,
    "tokenmorph.models": 2,
    "tokenmorph.data": 2,
    "tokenmorph.viz": 2,
    "tokenmorph.runtime": 3,
    "tokenmorph.hub": 4,
    "tokenmorph.recipes": 5,
    "tokenmorph.eval": 6,
    "tokenmorph.bench": 6,
    "tokenmorph.commands": 7,
    "tokenmorph.cli": 8,  # registers the commands
    "tokenmorph.__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit(module: str) -> str:
    """The LAYERS entry a module belongs to."""
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return best


def imports(path: Path) -> set[str]:
    """Every tokenmorph module ``path`` imports, anywhere in the file."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tokenmorph":
                continue
            # "from .pkg import mod" may name a submodule
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(
                    sub
                    if (ROOT.parent / Path(*sub.split("."))).exists()
                    or (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                    else target
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tokenmorph"}
    found.discard(mod)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    for mod in graph():
        assert unit(mod) in LAYERS, mod


def test_imports_only_point_downwards():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            a, b = unit(mod), unit(dep)
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and a != b and LAYERS[a] > 0):
                bad.append(f"{mod} (layer {LAYERS[a]}: {a}) imports {dep} (layer {LAYERS[b]}: {b})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    # a package's __init__ importing its own submodules is how re-exports work: not a cycle to
    # report
    edges = {
        m: {d for d in deps if d in g and not (m.startswith(d + ".") and d in LAYERS)}
        for m, deps in g.items()
    }
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above can fail: a planted upward import (ops importing the runtime) is reported."""
    planted = ROOT / "ops" / "_planted_for_test.py"
    planted.write_text("from ..runtime.seeding import mix_seed\n")
    try:
        deps = imports(planted)
        assert "tokenmorph.runtime.seeding" in deps
        assert LAYERS[unit("tokenmorph.runtime.seeding")] > LAYERS[unit(module_name(planted))]
    finally:
        planted.unlink()
