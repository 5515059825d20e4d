"""The project's modules import one way: the graph of `import X` / `from X import` between the top-level
modules, function-level imports included, has no cycle (a reader can follow it bottom up)."""
import ast
import os

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports_of(name):
    """Project modules that `name`.py imports anywhere in its body (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(MODULES) - {name})


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in graph:
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_project_imports_form_a_dag():
    graph = {m: imports_of(m) for m in MODULES}
    assert "train" in graph and "losses" in graph["train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_trainer():
    """train.py is the top: study.py gets its single-run function handed in, never imports it."""
    assert [m for m in MODULES if "train" in imports_of(m)] == []
