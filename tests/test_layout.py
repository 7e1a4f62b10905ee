"""The project's layout, read from the source with `ast`: the lesson files and the scripts a user runs at the top,
the machinery package below them, and one test file per source file.

Catches a machinery module that imports a lesson file or an entry script (`import model` in machinery/, or `bench`):
the layer would then hold only by convention, and following a call would go down and up again. Catches an import
cycle among the top-level and machinery modules (the README says a file imports only files above it), and a source
file without its test file, or a test file whose source file is gone (tests/ mirrors the source layout).
"""

import ast
from pathlib import Path

from tests.helpers import ROOT

TESTS = ROOT / "tests"
# test files that test no single source file: `make demo` as a whole, and this file
WHOLE = {TESTS / "test_demo.py", TESTS / "test_layout.py"}


def top_level() -> list[Path]:
    """The lesson files and entry scripts: every *.py at the repository's top."""
    return sorted(ROOT.glob("*.py"))


def machinery() -> list[Path]:
    """The machinery modules (the package's __init__.py included: it is imported too)."""
    return sorted((ROOT / "machinery").glob("*.py"))


def module_name(path: Path) -> str:
    """model.py -> "model"; machinery/common.py -> "machinery.common"; machinery/__init__.py -> "machinery"."""
    if path.parent == ROOT:
        return path.stem
    return "machinery" if path.stem == "__init__" else f"machinery.{path.stem}"


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) for every module `path` imports, anywhere in the file (also inside functions): `import a.b`
    gives a.b, `from a import b` gives a.b where a.b is one of our modules (else a), `from . import b` resolves
    against the package."""
    ours = {module_name(p) for p in top_level() + machinery()}
    package = "machinery" if path.parent.name == "machinery" else ""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in
                base = ".".join(filter(None, [package, base]))
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in ours else base, node.lineno))
    return found


def test_no_machinery_module_imports_a_lesson_file_or_an_entry_script():
    """A machinery module gets what it needs from above passed in (a block class, a log-prob function, a weights id);
    it never imports a top-level file or the benchmarks. Catches `import model` (or `from data import ...`, or
    `import bench`) added to any module of machinery/, also inside a function."""
    above = {p.stem for p in top_level()} | {"bench"}
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in machinery() for name, line in imports(p)
             if name.split(".")[0] in above]
    assert machinery(), f"no machinery/*.py under {ROOT}"
    assert not wrong, "machinery imports from above it:\n" + "\n".join(wrong)


def test_the_import_graph_is_acyclic():
    """The top-level and machinery modules import one another without a cycle (a later file imports earlier ones,
    never the reverse). Catches a lesson file importing one that imports it back, as sampling -> evalstore -> reward
    -> evalstore did; the message prints the cycle."""
    paths = top_level() + machinery()
    ours = {module_name(p) for p in paths}
    graph = {module_name(p): sorted({name for name, _ in imports(p) if name in ours} - {module_name(p)})
             for p in paths}
    state, stack = {}, []  # state: 1 while on the DFS stack, 2 when done

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
    assert "model" in graph and "machinery.common" in graph, sorted(graph)


def test_every_source_file_has_its_test_file_and_every_test_file_its_source():
    """tests/ mirrors the source: tests/test_<name>.py for each top-level <name>.py, tests/machinery/test_<name>.py for
    each machinery/<name>.py. Catches a new source file without tests, tests left in a file named after another
    source file (or after one that was renamed or removed), and a test file beside the mirror. The benchmarks'
    tests live in tests/bench/, which the benchmarks' layout decides."""
    want = {TESTS / f"test_{p.stem}.py" for p in top_level()}
    want |= {TESTS / "machinery" / f"test_{p.stem}.py" for p in machinery() if p.stem != "__init__"}
    have = set(TESTS.glob("test_*.py")) | set((TESTS / "machinery").glob("test_*.py"))
    missing = sorted(str(p.relative_to(ROOT)) for p in want - have)
    orphans = sorted(str(p.relative_to(ROOT)) for p in have - want - WHOLE)
    assert not missing and not orphans, f"source files without a test file: {missing}; test files without a " \
                                        f"source file: {orphans}"
