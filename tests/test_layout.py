"""The package's shape: no import circles, layers import only downwards, small modules.

Reads the source (ast), imports nothing: a circle hidden behind a function-local import
counts as much as one at the top of a module, because it is the same knot to untie.
"""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "ublkshell"

# lower layers first; a module may import its own layer and those before it
LAYERS = [
    {"errors", "units", "files", "procs", "_native", "colour"},
    {"kernel", "vm"},
    {"devices"},
    {"validate"},
    {"observe", "faults", "crash"},
    {"verbs", "commands", "api", "demo", "completions"},
    {"bridge"},
    {"repl", "cli", "pytest_plugin", "__main__", "__init__"},
]
MAX_LINES = 420  # about 400: a file may say at its top why it is longer


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "native" not in p.parts}


def _imports(name: str, path: pathlib.Path, known: set) -> set:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def _graph() -> dict:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{mod}: its folder ({top}) is in no layer of tests/test_layout.py")


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_layers_import_only_downwards():
    graph = _graph()
    up = [f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
          for m, deps in sorted(graph.items()) for n in sorted(deps)
          if n != "ublkshell" and _layer(n) > _layer(m)]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_the_walk_sees_the_whole_package():
    graph = _graph()
    # a broken walk (wrong root, relative imports misread) would pass the two tests above
    assert "ublkshell.bridge.server" in graph and "ublkshell.devices.lifecycle" in graph
    assert "ublkshell.kernel.ctrl" in graph["ublkshell.devices.lifecycle"]


def test_modules_are_small_or_say_why():
    big = []
    for path in list(PKG.rglob("*.py")) + list((PKG / "native").glob("*.[ch]")):
        text = path.read_text()
        head = "\n".join(text.splitlines()[:40]).lower()
        if text.count("\n") > MAX_LINES and "longer than" not in head:
            big.append(f"{path.relative_to(PKG.parent)}: {text.count(chr(10))} lines")
    assert not big, (f"over {MAX_LINES} lines without a reason at the top "
                     "(a line saying why it is longer than that):\n" + "\n".join(big))


def test_every_basics_entry_names_a_vm_test():
    """A misspelt entry in tests/vm/conftest.py's BASICS would silently drop a test from the
    run on the stable kernel: each must name a test (or file) that pytest collects."""
    import subprocess
    import sys

    from tests.vm.conftest import BASICS

    root = pathlib.Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                        "-m", "vm and basics", "tests/vm"], cwd=root, capture_output=True, text=True)
    ids = [line.removeprefix("tests/vm/") for line in p.stdout.splitlines() if "::" in line]
    assert ids, p.stdout + p.stderr
    for entry in BASICS:
        assert any(i == entry or i.startswith(entry + "::") for i in ids), entry
