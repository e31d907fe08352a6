"""The package's shape: imports run one way (README, "How the code is organised").

Read from the source with `ast`, so a violation is named by file and line: no module imports
a private name of another ufmjax module; the kernel and the optimiser import no model and no
run; the theory imports no JAX; nothing imports the CLI or the report from below; no import
circle between modules.
"""

import ast
from pathlib import Path

import ufmjax

ROOT = Path(ufmjax.__file__).parent
# Layers from the bottom; a module may import only from its own layer or below.
LAYERS = [
    {"ufmjax.common", "ufmjax.data", "ufmjax.theory"},
    {"ufmjax.steering"},
    {"ufmjax.models", "ufmjax.kernel"},
    {"ufmjax.optimize", "ufmjax.analysis"},
    {"ufmjax.runs"},
    {"ufmjax.report"},
    {"ufmjax.cli"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path):
    """(line, imported module, [names]) of every ufmjax import in a file, lazy ones included."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ufmjax"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ufmjax"):
                    yield node.lineno, a.name, []


def layer_of(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    return -1  # the package root


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_no_private_names_cross_modules():
    bad = []
    for name, path in MODULES.items():
        for line, mod, names in imports(path):
            if mod != name:
                bad += [f"{path.name}:{line} imports {mod}.{n}" for n in names
                        if n.startswith("_") and not n.endswith("__")]
    assert not bad, bad


def test_imports_run_one_way():
    bad = []
    for name, path in MODULES.items():
        own = layer_of(name)
        for line, mod, _ in imports(path):
            if layer_of(mod) > own >= 0:
                bad.append(f"{name}:{line} imports {mod} (a higher layer)")
    assert not bad, bad


def test_kernel_and_optimiser_import_no_model_and_theory_no_jax():
    for name, path in MODULES.items():
        mods = [m for _, m, _ in imports(path)]
        if name.startswith(("ufmjax.kernel", "ufmjax.optimize")):
            assert not [m for m in mods if m.startswith(("ufmjax.models", "ufmjax.runs"))], name
        if name.startswith("ufmjax.theory"):
            text = path.read_text()
            assert "import jax" not in text and "from jax" not in text, name


def test_no_import_circle():
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for _, mod, names in imports(path):
            # `from ufmjax.pkg import submodule` depends on the submodule itself.
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            deps |= set(subs) if subs else {mod}
        graph[name] = {d for d in deps if d in MODULES and d != name}
    # A package's __init__ re-exports its submodules; a submodule naming its own package for a
    # sibling (`from ufmjax.runs import io`) is resolved to the sibling above.
    state = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_public_api_names():
    import ufmjax as uj

    for name in uj.__all__:
        assert getattr(uj, name) is not None, name
    assert uj.sweep is uj.kernel.sweep
    # `ufmjax.optimize` is both the subpackage and the solver: the module is callable.
    import ufmjax.optimize  # noqa: F401 (the import that would shadow a plain function)

    assert uj.optimize.Problem is uj.Problem
    assert uj.optimize.__call__.__doc__ and callable(uj.optimize)
