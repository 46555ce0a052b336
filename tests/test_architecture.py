"""The package layout: layers import only downward (import-linter's contract in pyproject.toml),
no import cycles, imports at module level only (outside cli/ and package faces), small modules."""

import ast
import pathlib
import shutil
import subprocess
import sys

import grimp

PACKAGE = pathlib.Path(__file__).parent.parent / "jaxgen"


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent)) or "lint-imports"
    out = subprocess.run([exe], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def _cycle(graph) -> list[str] | None:
    """One cycle of module imports, or None (depth-first search over the module graph)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    graph = grimp.build_graph("jaxgen")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "b", "c"):
        graph.add_module(m)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    assert _cycle(graph) is None
    graph.add_import(importer="c", imported="a")
    assert _cycle(graph) == ["a", "b", "c", "a"]


def _function_level_imports(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lines += [s.lineno for s in ast.walk(node) if isinstance(s, ast.Import | ast.ImportFrom)]
    return sorted(set(lines))


def test_imports_are_at_module_level_outside_cli_and_faces():
    # Every dependency shows at the top of its module (and so in the layers check); only the
    # command line defers imports, so `jaxgen config show` does not load JAX.
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or path.parent.name == "cli":
            continue
        found += [
            f"{path.relative_to(PACKAGE.parent)}:{n}" for n in _function_level_imports(path.read_text())
        ]
    assert not found, found


def test_the_function_level_import_scan_sees_nested_imports():
    assert _function_level_imports("import os\ndef f():\n    if 1:\n        import json\n") == [4]
    assert _function_level_imports("import os\n") == []


def test_layout_is_packages_with_few_top_level_modules_and_small_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 5, top
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    for name in ("config", "runtime", "tokenizer", "model", "data", "train", "decode", "inference",
                 "evaluate", "convert", "cli", "bench"):  # fmt: skip
        assert name in packages, name
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long
