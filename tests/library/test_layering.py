"""The package's layering, read from its source: the library core (``rnn_fast/__init__.py``, ``rnn_fast/modules/``,
``rnn_fast/ops/``, ``rnn_fast/testing.py``) imports nothing outside itself, the NSynth application
(``rnn_fast.nsynth``) least of all, and no module of ``rnn_fast`` imports itself back through others. Every import
statement counts, those inside functions too: a cycle hidden in a function still runs when it is called."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import rnn_fast

PACKAGE = Path(rnn_fast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


# The library core; rnn_fast._C is its compiled ops.
CORE = ("rnn_fast", "rnn_fast._C", "rnn_fast.modules", "rnn_fast.ops", "rnn_fast.testing")


def is_core(module: str) -> bool:
    return module in CORE or module.startswith(("rnn_fast.modules.", "rnn_fast.ops."))


def imported_modules(module: str) -> Set[str]:
    """The modules of rnn_fast that ``module``'s import statements name: ``from package import name`` names the
    submodule ``package.name`` where there is one, else ``package`` itself."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: from the module's package, one level up per dot after the first
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + [node.module] if node.module else anchor)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name == "rnn_fast" or name.startswith("rnn_fast.")}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A path ``[a, b, ..., a]`` of ``graph``'s edges, or None when it has no cycle."""
    state: Dict[str, str] = {}  # "open" while on the current path, then "done"
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_the_import_graph_is_read():
    """The reader sees relative, absolute and function-level imports (a vacuous graph would pass the rest)."""
    assert {"rnn_fast.ops.lstm.reference", "rnn_fast.ops.lstm.steps"} <= GRAPH["rnn_fast.ops.lstm.autograd"]
    assert "rnn_fast.ops.lstm.layer" in GRAPH["rnn_fast.modules.lstm"]
    assert "rnn_fast" in GRAPH["rnn_fast.ops.lstm.extension"]  # from ... import _C
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_core_imports_only_the_core():
    """Not the application (``rnn_fast.nsynth``), nor anything else outside the core."""
    outside = {module: sorted(name for name in imported if not is_core(name))
               for module, imported in GRAPH.items() if is_core(module)}
    assert {module: names for module, names in outside.items() if names} == {}


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_importing_the_library_loads_no_application_module():
    """In a fresh interpreter: the package, its testing helpers and every backend it can load."""
    script = ("import sys, rnn_fast, rnn_fast.testing; rnn_fast.available_backends(); "
              "print('\\n'.join(sorted(name for name in sys.modules if name.startswith('rnn_fast'))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout.split()
    assert "rnn_fast.ops.lstm.naive" in loaded
    assert [name for name in loaded if not is_core(name)] == []
