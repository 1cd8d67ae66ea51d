"""The shape of core/ (issue 14): no import cycle between its modules, and functions that fit on a screen.

Both read the source with `ast`; nothing is imported or run. Every import counts, wherever it stands
(module top, inside a function, under `if __name__ == "__main__":`): a function-local import still
ties the two modules together, it only hides the tie until the function runs.
"""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"
MAX_FUNCTION_LINES = 80


def core_imports(path: Path) -> set[str]:
    """The core modules `path` imports, by module name (`core.model`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("core.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "core":  # from core import mup, checkpoint as ckpt_io
                found |= {f"core.{a.name}" for a in node.names}
            elif node.module.startswith("core."):
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"core.{p.stem}": p for p in CORE.glob("*.py") if p.stem != "__init__"}
    return {name: core_imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_modules_of_core_import_each_other_in_no_circle():
    graph = import_graph()
    assert "core.model" in graph["core.steps"]  # the walk sees imports at all
    cycle = find_cycle(graph)
    assert cycle is None, (f"import cycle in core/: {' -> '.join(cycle)}. Move what both sides need into a "
                           "module that imports neither (as core/steps.py holds the step's building blocks).")


def test_no_function_in_core_is_longer_than_a_screen():
    too_long = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"core/{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named parts): {too_long}"
