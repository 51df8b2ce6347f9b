"""The import direction of architecture.md, no import cycles between files, and no reference
libraries in product code."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ldm", "controlnet", "samplers", "mrlf", "segmentation", "train", "bench", "tests"}
ALLOWED = {
    "ldm": set(),
    "samplers": set(),
    "controlnet": {"ldm"},
    "segmentation": {"ldm", "samplers"},  # samplers: the DDIM inversion of DIFF's diffusion features
    "mrlf": {"ldm", "controlnet", "samplers", "segmentation"},
    "train": {"ldm", "controlnet", "samplers", "segmentation", "mrlf"},
}
FORBIDDEN = {"diffusers", "transformers", "accelerate"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod, line in _imports(path):
            own = mod == package
            if mod in FORBIDDEN or (mod in PROJECT and not own and mod not in ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_checker_sees_violations(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import diffusers\nfrom mrlf.pipeline import x\n")
    assert [m for m, _ in _imports(bad)] == ["diffusers", "mrlf"]


# ---------------------------------------------------------------------------------------------- file-level cycles
def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """module -> the project modules it imports, from every import statement in the file (inside
    functions too: a lazy import is still a dependency), relative ones resolved.

    `from pkg import name` depends on the module pkg.name if there is one, else on pkg's __init__.
    Importing pkg.mod also runs pkg/__init__.py, but that is Python's package mechanics, not a
    dependency of the importing file, so it adds no edge (else every re-exporting __init__ would be
    a cycle).
    """
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:  # the module a dotted name lives in (a.b.func -> a.b)
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base))
        graph[mod] = targets - {None, mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(mod):
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod)):
            return cycle
    return None


def test_no_import_cycles_between_files():
    graph = import_graph(ROOT, sorted(PROJECT - {"tests"}))
    assert "ldm.unet" in graph["controlnet.model"]  # the graph sees the project's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_checker_sees_lazy_and_relative_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    import pkg.c\n")  # lazy, inside a function
    (pkg / "c.py").write_text("from pkg.sub import d\n")
    (pkg / "sub" / "d.py").write_text("x = 1\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.sub.d"}, "pkg.sub.d": set()}
    assert find_cycle(graph) is None
    (pkg / "sub" / "d.py").write_text("def h():\n    from .. import a\n")  # d -> a -> b -> c -> d
    assert find_cycle(import_graph(tmp_path, ["pkg"])) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.sub.d", "pkg.a"]
