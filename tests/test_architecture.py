"""The package's shape: no import circle, and no import from a layer above a module's own.

The import graph of hpcjobs/ is read from the source with ``ast``, every import counted,
those inside functions too (an import that runs late is still a dependency). An edge goes
to the module named; importing ``a.b.c`` does not count as importing ``a.b``'s __init__
(Python has it loaded by then, whichever way the first import came).  The CLI imports its
commands by name from its table (``Command(name, "train.command", ...)``): those count too.

The layers, from the top (a module may import from its own layer and those below):
"""
import ast
import os

HPCJOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hpcjobs")

LAYERS = [  # top first; a package's `command` module sits in the commands layer, whatever its package
    ("entry", {"cli", "__main__"}),
    ("commands", {"*.command"}),
    ("command packages", {"infer", "search", "slurm", "doctor"}),
    ("training", {"train"}),
    ("models and data", {"models", "data"}),
    ("what training ends with", {"evaluation", "export"}),
    ("config and cluster", {"config", "cluster"}),
    ("base", {"", "rundir", "record", "digest", "errors", "units", "compat", "plugins"}),
]
__doc__ += "\n".join(f"  {name}: {', '.join(sorted(parts)) or 'hpcjobs'}" for name, parts in LAYERS)


def modules() -> dict[str, str]:
    """Module name (``hpcjobs.train.step``) -> file."""
    found = {}
    for folder, _, files in os.walk(HPCJOBS):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, os.path.dirname(HPCJOBS))[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: str, known) -> set[str]:
    """The hpcjobs modules that ``name`` imports, anywhere in its file."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Command" and len(node.args) > 1:
            out.add(f"hpcjobs.{node.args[1].value}")  # cli.COMMANDS: the module of a command
    return {m for m in out if m == "hpcjobs" or m.startswith("hpcjobs.")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) - {name} for name, path in known.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "command":
        return 1
    top = parts[1] if len(parts) > 1 else ""
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module}: in no layer of LAYERS (add its package there)")


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    g = graph()
    assert "hpcjobs.train.step" in g and "hpcjobs.cli" in g
    assert "hpcjobs.evaluation.metrics" in g["hpcjobs.train.step"]
    assert {"hpcjobs.train.command", "hpcjobs.slurm.command"} <= g["hpcjobs.cli"]  # through its table


def test_no_import_circle():
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_from_a_higher_layer():
    g = graph()
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a in sorted(g) for b in sorted(g[a]) if layer(b) < layer(a)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_a_circle_and_an_upward_import_are_seen():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("hpcjobs.train.loop") > layer("hpcjobs.slurm.render") > layer("hpcjobs.export.command")
    assert layer("hpcjobs.rundir") == layer("hpcjobs") == len(LAYERS) - 1
