"""Dependency arrows: devices <- edge <- {weights_tools, tui}; edge never imports textual."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "devices": {"edge", "weights_tools", "tui", "textual"},
    "edge": {"weights_tools", "tui", "textual"},
    "weights_tools": {"tui", "textual"},
    "tui": {"weights_tools"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_arrows(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = imports_of(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_cli_start_is_lean():
    """`edge --help` must not import the heavy parts (onnxruntime, llama_cpp, textual, zarr)."""
    import subprocess
    import sys

    code = ("import sys; from edge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('onnxruntime', 'llama_cpp', 'textual', 'zarr', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
