"""The house rules of the package, checked on its source: no import cycle, the oracle used
by tests only, the Triton backend independent of the CPU one, no private names borrowed
across modules."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hapo_kernels", "hapo")


def modules():
    """``{module name: path}`` of every module of both packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def runtime_nodes(tree):
    """Every node that runs: all of ``tree`` but the bodies of ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imports_of(name, path, known):
    """The package modules ``name`` imports when it runs (module level and functions;
    type-checking-only imports are annotations, not imports)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycle(graph):
    """Depth-first search over the import graph; a package's ``__init__`` importing its own
    submodules is the package's API, not a cycle, so parent-package edges are left out."""
    def edges(name):
        return {t for t in graph[name] if not name.startswith(t + ".")}

    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for t in sorted(edges(name)):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_reference_is_imported_by_tests_only(graph):
    users = sorted(n for n, deps in graph.items() if "hapo_kernels.reference" in deps)
    assert users == [], f"library modules import the float64 oracle: {users}"


def test_triton_backend_imports_nothing_from_cpu(graph):
    bad = sorted(n for n, deps in graph.items() if n.startswith("hapo_kernels.triton")
                 and any(d.startswith("hapo_kernels.cpu") for d in deps))
    assert bad == [], f"Triton modules import the CPU backend: {bad}"


def test_no_private_names_across_modules():
    """``from x import _name`` or ``module._name`` of another package module."""
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_one_version_string():
    import hapo
    import hapo_kernels
    assert hapo.__version__ == hapo_kernels.__version__
    text = (ROOT / "pyproject.toml").read_text()
    assert 'version = {attr = "hapo_kernels.version.__version__"}' in text


def test_trl_integration_without_trl_names_the_install_line():
    """Importing hapo.integrations.trl where TRL is missing: an ImportError with the
    extra's install line (TRL is hidden from a fresh interpreter, installed or not)."""
    import subprocess
    import sys
    code = ("import sys\n"
            "sys.modules['trl'] = None\n"
            "try:\n"
            "    import hapo.integrations.trl\n"
            "except ImportError as e:\n"
            "    print('MESSAGE:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'pip install -e ".[trl]"' in done.stdout, done.stdout
    assert 'pip install "hapo-kernels[trl] @ git+https://' in done.stdout, done.stdout


def test_everything_public_has_a_docstring():
    """Modules, public functions, classes and methods (Triton ``@jit`` kernels excepted:
    their launchers document them)."""
    def jitted(node):
        return any("jit" in ast.unparse(d) for d in node.decorator_list)

    missing = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(name)

        def visit(nodes, prefix):
            for node in nodes:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and \
                        not node.name.startswith("_") and not jitted(node):
                    if not ast.get_docstring(node):
                        missing.append(f"{prefix}{node.name}")
                    if isinstance(node, ast.ClassDef):
                        visit(node.body, f"{prefix}{node.name}.")
        visit(tree.body, f"{name}.")
    assert not missing, f"no docstring: {missing}"
