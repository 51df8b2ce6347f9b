"""The import direction of architecture.md, and no reference libraries in product code."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ldm", "controlnet", "samplers", "mrlf", "segmentation", "train", "bench", "tests"}
ALLOWED = {
    "ldm": set(),
    "samplers": set(),
    "controlnet": {"ldm"},
    "segmentation": {"ldm"},
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
