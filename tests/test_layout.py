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


PACKAGES = ("edge", "weights_tools", "tui")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import of a project module in the file, at module level or inside functions: (module, names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_no_import_cycles():
    """Between the project's modules, counting imports inside functions too: every dependency runs one way."""
    files = {module_name(f): f for p in PACKAGES for f in (ROOT / p).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for mod, names in project_imports(f):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in files] or [mod]
            graph[m] |= {t for t in targets if t in files and t != m}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_crosses_a_module():
    """`from module import _name` and `module._name` of a project module appear nowhere (tests included)."""
    bad = []
    for f in [f for p in (*PACKAGES, "tests", "benchmarks") for f in (ROOT / p).rglob("*.py")]:
        tree = ast.parse(f.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                bad += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{f.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert not bad, bad
