"""The house rules of issue 11, checked on the source code rather than kept by convention.

(a) the package's import graph has no cycle; (b) no underscore-named function, class or variable
is imported from another module of the package (benchmarks and tests included); (c) no function
imports the package's own modules; (d) ``import gradcam_jax`` loads nothing of the command line;
(e) library modules stay under 450 lines and (f) functions under 80, unless a comment in the
function says ``long-function: <why>``.

Everything is read with :mod:`ast` (and :mod:`tokenize` for comments): nothing here imports the
package except rule (d), which runs in a subprocess.
"""

import ast
import functools
import io
import itertools
import os
import subprocess
import sys
import tokenize
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gradcam_jax"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_MARK = "long-function:"

FUNCTIONS = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Source:
    path: str  # relative to the repository root, for messages
    module: str  # dotted module name (``gradcam_jax.dataset`` for ``gradcam_jax/dataset/__init__.py``)
    is_package: bool
    text: str

    @functools.cached_property
    def tree(self) -> ast.Module:
        return ast.parse(self.text, self.path)

    @classmethod
    def read(cls, path: Path) -> "Source":
        parts = path.relative_to(REPO).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        return cls(str(path.relative_to(REPO)), module, is_package, path.read_text(encoding="utf-8"))


@functools.cache
def sources(folder: str) -> tuple[Source, ...]:
    paths = sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return tuple(Source.read(p) for p in paths)


@functools.cache
def package_modules() -> frozenset[str]:
    return frozenset(s.module for s in sources(PACKAGE))


def is_ours(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def fail_if(found: list[str], what: str) -> None:
    if found:
        pytest.fail(f"{len(found)} {what}:\n" + "\n".join(found), pytrace=False)


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# --------------------------------------------------------------------------------------------
# Resolving import statements


def import_base(src: Source, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` statement reads from."""
    if node.level == 0:
        return node.module
    package = src.module if src.is_package else src.module.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return None  # beyond the top-level package: not an import of ours
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


@dataclass(frozen=True)
class Imported:
    module: str  # the module that gets loaded
    name: str | None  # the attribute taken from it, None when a module itself is imported
    bound: str | None  # the local name bound to a module by the statement, if any
    bound_to: str | None  # that module
    line: int


def our_imports(src: Source, node: ast.Import | ast.ImportFrom, modules: frozenset[str]) -> list[Imported]:
    """What an import statement takes from the package (nothing for third-party imports)."""
    found = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if is_ours(alias.name):  # `import gradcam_jax.x` binds gradcam_jax, `... as y` binds y to x
                bound_to = alias.name if alias.asname else alias.name.partition(".")[0]
                found.append(Imported(alias.name, None, alias.asname or bound_to, bound_to, node.lineno))
        return found
    base = import_base(src, node)
    if not is_ours(base):
        return found
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.append(Imported(submodule, None, alias.asname or alias.name, submodule, node.lineno))
        else:
            found.append(Imported(base, alias.name, None, None, node.lineno))
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(nodes, in_functions=False) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (class bodies and ``try``/``if``
    blocks count, ``if TYPE_CHECKING:`` blocks do not), and with ``in_functions`` also those that
    run when its functions are called."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, FUNCTIONS | ast.Lambda) and not in_functions:
            continue
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            found += runtime_imports(node.orelse, in_functions)
        else:
            found += runtime_imports(ast.iter_child_nodes(node), in_functions)
    return found


# --------------------------------------------------------------------------------------------
# (a) import cycles


def import_graph(srcs, modules, in_functions=False) -> dict[str, dict[str, str]]:
    """module -> {imported module: "path:line"} for the imports that run at import time (and
    with ``in_functions``, also those inside functions).

    Importing ``gradcam_jax.dataset.store`` from outside ``gradcam_jax.dataset`` also runs
    ``gradcam_jax/dataset/__init__.py``, so that package is an edge too; the importer's own
    enclosing packages are not (they are already being imported).
    """
    graph: dict[str, dict[str, str]] = {}
    for src in srcs:
        edges = graph.setdefault(src.module, {})
        own = {src.module, *ancestors(src.module)}
        for node in runtime_imports(src.tree.body, in_functions):
            for imp in our_imports(src, node, modules):
                for target in [*ancestors(imp.module), imp.module]:
                    if target not in own and target in modules:
                        edges.setdefault(target, f"{src.path}:{imp.line}")
    return graph


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's algorithm: the components with a cycle (more than one module, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    counter = itertools.count()
    components = []

    def visit(v):
        index[v] = low[v] = next(counter)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in components if len(c) > 1 or c[0] in graph.get(c[0], ())]


def shortest_cycle(graph, component) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in inside and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def describe_cycle(graph, cycle) -> str:
    steps = [cycle[0]] + [f"-> {b} ({graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " ".join(steps)


# The module-level graph is the rule; counting function-local imports as edges too shows the cycles
# that such imports hide (rule (c) forbids them, so the two agree once (c) passes).
@pytest.mark.parametrize("in_functions", [False, True], ids=["module-level", "with-function-local"])
def test_no_import_cycle(in_functions):
    graph = import_graph(sources(PACKAGE), package_modules(), in_functions)
    cycles = [describe_cycle(graph, shortest_cycle(graph, c)) for c in strongly_connected(graph)]
    fail_if(cycles, f"import cycles in {PACKAGE}")


# --------------------------------------------------------------------------------------------
# (b) private names across module borders


def private_name_uses(src: Source, modules: frozenset[str]) -> list[str]:
    """``from gradcam_jax.x import _name`` and ``x._name`` where ``x`` is one of our modules
    (importing a private *module* is allowed; the rule is about names)."""
    found = []
    aliases: dict[str, str] = {}
    for node in ast.walk(src.tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for imp in our_imports(src, node, modules):
            if imp.bound is not None:
                aliases[imp.bound] = imp.bound_to
            if imp.name is not None and is_private(imp.name) and imp.module != src.module:
                found.append((imp.line, f"from {imp.module} import {imp.name}"))

    def resolve(expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = resolve(expr.value)
            if base is not None and f"{base}.{expr.attr}" in modules:
                return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(src.tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = resolve(node.value)
            if base is not None and base != src.module and f"{base}.{node.attr}" not in modules:
                found.append((node.lineno, f"{base}.{node.attr}"))
    return [f"{src.path}:{line}: {what}" for line, what in sorted(found, key=lambda f: f[0])]


def test_no_private_name_crosses_a_module_border():
    modules = package_modules()
    found = [
        use
        for folder in (PACKAGE, "benchmarks", "tests")
        for s in sources(folder)
        for use in private_name_uses(s, modules)
    ]
    fail_if(found, "uses of underscore names from other modules (give shared names a plain name)")


# --------------------------------------------------------------------------------------------
# (c) function-local imports of our own modules


def local_imports(src: Source, modules: frozenset[str]) -> list[str]:
    found = {}
    for function in ast.walk(src.tree):
        if not isinstance(function, FUNCTIONS):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom) and our_imports(src, node, modules):
                # ast.walk reaches nested functions after their parents: the innermost one wins.
                found[node.lineno] = f"{src.path}:{node.lineno}: in {function.name}(): {ast.unparse(node)}"
    return [found[line] for line in sorted(found)]


def test_no_function_local_import_of_our_modules():
    modules = package_modules()
    found = [use for s in sources(PACKAGE) for use in local_imports(s, modules)]
    fail_if(found, f"function-local imports of {PACKAGE} modules")


# --------------------------------------------------------------------------------------------
# (d) the command line stays out of `import gradcam_jax`


def test_import_does_not_load_the_command_line():
    code = (
        "import gradcam_jax, sys\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('gradcam_jax.cli'))\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(f"`import gradcam_jax` loads the command line:\n{result.stderr.strip()}", pytrace=False)


# --------------------------------------------------------------------------------------------
# (e) module size and (f) function size


def test_modules_are_short():
    long = [
        f"{s.path}: {n} lines"
        for s in sources(PACKAGE)
        if (n := len(s.text.splitlines())) >= MAX_MODULE_LINES
    ]
    fail_if(long, f"modules of {MAX_MODULE_LINES} lines or more")


def marked_lines(src: Source) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(src.text).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT and LONG_FUNCTION_MARK in t.string}


def functions(tree, prefix=""):
    """(qualified name, node) for every function, methods and nested functions included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, FUNCTIONS | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if isinstance(node, FUNCTIONS):
                yield name, node
            yield from functions(node, f"{name}." if isinstance(node, ast.ClassDef) else f"{name}.<locals>.")
        else:
            yield from functions(node, prefix)


def own_lines(function) -> set[int]:
    """The function's lines, without those of the functions defined inside it."""
    lines = set(range(function.lineno, function.end_lineno + 1))
    for node in ast.walk(function):
        if node is not function and isinstance(node, FUNCTIONS):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines -= set(range(start, node.end_lineno + 1))
    return lines


def long_functions(src: Source) -> list[str]:
    marks = marked_lines(src)
    found = []
    for name, node in functions(src.tree):
        length = node.end_lineno - node.lineno + 1
        if length >= MAX_FUNCTION_LINES and not marks & own_lines(node):
            found.append(f"{src.path}:{node.lineno}: {name}() {length} lines")
    return found


def test_functions_are_short():
    found = [f for s in sources(PACKAGE) for f in long_functions(s)]
    fail_if(
        found, f"functions of {MAX_FUNCTION_LINES} lines or more without a '# {LONG_FUNCTION_MARK} <why>'"
    )


# --------------------------------------------------------------------------------------------
# The checks themselves, on small made-up packages (so that a pass above means something)


def fake(module, text, is_package=False):
    path = module.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    return Source(path, module, is_package, text)


def test_checker_finds_a_cycle_through_a_subpackage():
    srcs = [
        fake("gradcam_jax", "from . import a\n", is_package=True),
        fake("gradcam_jax.a", "from .sub.b import f\n"),
        fake("gradcam_jax.sub", "from . import c\n", is_package=True),
        fake("gradcam_jax.sub.b", "def f(): pass\n"),
        fake("gradcam_jax.sub.c", "import gradcam_jax.a as a\nif TYPE_CHECKING:\n    from .. import x\n"),
        fake("gradcam_jax.x", "def g():\n    from .a import f\n"),
    ]
    modules = frozenset(s.module for s in srcs)
    graph = import_graph(srcs, modules)
    (component,) = strongly_connected(graph)
    assert component == ["gradcam_jax.a", "gradcam_jax.sub", "gradcam_jax.sub.c"]
    cycle = shortest_cycle(graph, component)
    assert cycle == ["gradcam_jax.a", "gradcam_jax.sub", "gradcam_jax.sub.c", "gradcam_jax.a"]
    assert "(gradcam_jax/a.py:1)" in describe_cycle(graph, cycle)
    assert local_imports(srcs[-1], modules) == ["gradcam_jax/x.py:2: in g(): from .a import f"]
    assert "gradcam_jax.a" not in graph["gradcam_jax.x"]
    assert import_graph(srcs, modules, in_functions=True)["gradcam_jax.x"] == {
        "gradcam_jax.a": "gradcam_jax/x.py:2"
    }


def test_checker_finds_private_names():
    modules = frozenset({"gradcam_jax", "gradcam_jax.zoo", "gradcam_jax.zoo._pretrained", "gradcam_jax.a"})
    src = fake(
        "tests.test_x",
        (
            "import gradcam_jax as gcj\n"
            "from gradcam_jax.zoo import _pretrained, __version__\n"
            "from gradcam_jax.a import _helper, public\n"
            "from other import _fine\n"
            "gcj.zoo._pretrained.CACHE, gcj.zoo._pretrained._fetch, _pretrained._cache_dir, gcj.a._x\n"
        ),
    )
    assert private_name_uses(src, modules) == [
        "tests/test_x.py:3: from gradcam_jax.a import _helper",
        "tests/test_x.py:5: gradcam_jax.zoo._pretrained._fetch",
        "tests/test_x.py:5: gradcam_jax.zoo._pretrained._cache_dir",
        "tests/test_x.py:5: gradcam_jax.a._x",
    ]


def test_checker_finds_long_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    marked = f"def marked():\n    # {LONG_FUNCTION_MARK} one table, read top to bottom\n{body}\n"
    inner = body.replace("    ", "        ")
    nested = f"def outer():\n    # {LONG_FUNCTION_MARK} only outer\n    def inner():\n{inner}\n"
    src = fake("gradcam_jax.m", f"def long():\n{body}\n\n{marked}\n{nested}")
    assert [f.split(": ", 1)[1] for f in long_functions(src)] == [
        f"long() {MAX_FUNCTION_LINES + 1} lines",
        f"outer.<locals>.inner() {MAX_FUNCTION_LINES + 1} lines",
    ]


@pytest.mark.parametrize("folder", [PACKAGE, "benchmarks", "tests"])
def test_sources_are_found(folder):
    assert len(sources(folder)) >= 3, f"no Python files found under {folder}/"
