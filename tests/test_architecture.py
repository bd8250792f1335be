"""The package's imports point down the recipe's layers and form no cycle: every `sftmix.*` import, at module level or
inside a function (a lazy import still ties the two modules together), read with `ast` from the source, so the test
needs no import. docs/architecture.md describes the layers."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sftmix"
ROOT = PKG.parent

# The layers, bottom to top: a module may import from its own layer or any layer below, never from one above. Each
# entry is a module or a package prefix; a module takes the layer of its longest matching entry (so `mixup.loss` is
# pure math while the rest of `mixup` is the trainers). The order is the recipe's where dependencies allow: support,
# data, then step 1's math and steps 2-3's trainers, step 1's orchestration (which trains a reference with the
# trainers), evaluation, report, the run and its commands.
LAYERS = [
    ["sftmix.utils", "sftmix.console"],  # errors, atomic writes, JSONL, logging
    ["sftmix.hub"],
    ["sftmix.data", "sftmix.models"],
    ["sftmix.rundir", "sftmix.tracking"],
    # pure math on arrays and tensors: step 1's split, scoring and online records, the Mixup loss
    ["sftmix.confidence.split", "sftmix.confidence.online", "sftmix.confidence.scoring", "sftmix.mixup.loss"],
    ["sftmix.mixup"],  # steps 2-3: the Mixup trainer's parts, SFTMixConfig, SFTMixTrainer
    # the configuration of a run: RunConfig, EvalConfig and parse_config, which composes the trainer's SFTMixConfig
    # (as TRL's scripts compose SFTConfig), so it sits above the trainers and below everything that reads a run's config
    ["sftmix.config"],
    ["sftmix.confidence"],  # step 1's orchestration: the reference run and the scoring callback (they train)
    ["sftmix.integrations"],  # axolotl's plugin: the trainer's parts plus step 1's confidence.jsonl, for axolotl
    ["sftmix.eval"],
    ["sftmix.report"],
    ["sftmix.run"],  # the stages, the sweep, the checks before a run
    ["sftmix.recipe"],  # `sftmix run`'s recipe, top to bottom
    ["sftmix.cli", "sftmix.__main__", "sftmix.evaluate"],  # the entry points
]

# Upward imports tolerated for now: none. Nothing may be added here: a new upward import is a layering bug.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from sftmix.run import pipeline` names a module; `from sftmix.x import f` names sftmix.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import sftmix.eval.tasks` as the deepest module that exists
                    t = t.rpartition(".")[0]
                if t and t != name and t != "sftmix":  # the root's lazy __getattr__ imports nothing eagerly
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of `module`'s layer (its longest matching entry), None if no entry matches."""
    best, index = -1, None
    for i, layer in enumerate(layers):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, index = len(entry), i
    return index


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> set[tuple[str, str]]:
    """Every import (importer, imported) whose target sits in a higher layer than its importer."""
    return {(m, t) for m, targets in graph.items() for t in targets if layer_of(t, layers) > layer_of(m, layers)}


def test_the_checker_sees_an_upward_import():
    layers = [["p.low"], ["p.mid"], ["p.top"]]
    assert upward_imports({"p.low": {"p.mid"}, "p.mid": set(), "p.top": {"p.low"}}, layers) == {("p.low", "p.mid")}
    assert upward_imports({"p.mid.a": {"p.top.b"}, "p.top.b": {"p.mid.a"}}, layers) == {("p.mid.a", "p.top.b")}
    assert layer_of("p.top.x.y", layers) == 2 and layer_of("q", layers) is None
    # the longest entry wins: a module placed below its package's layer
    assert layer_of("sftmix.mixup.loss") < layer_of("sftmix.mixup.trainer") < layer_of("sftmix.confidence.reference")


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if m != "sftmix" and layer_of(m) is None)
    assert not missing, f"modules in no layer of LAYERS (add each where it belongs): {missing}"


def test_imports_point_down_the_layers():
    test_every_module_has_a_layer()  # (a module in no layer has no place to compare)
    upward = upward_imports(import_graph())
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports pointing up the layers (tests/test_architecture.py LAYERS; docs/architecture.md): " + \
        "; ".join(f"{m} -> {t}" for m, t in new)
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"KNOWN_UPWARD lists imports that no longer exist; remove them: {gone}"


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "sftmix.mixup.loss" in import_graph()["sftmix.mixup.mixin"]  # lazy and top-level imports are both read


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ----------------------------------------------------------------------------------------------------------------
# Re-exports live in sftmix/__init__.py only: everywhere else a name is imported from the module that defines it, so
# that importing a pure function never drags in a heavier module that happens to import it too.


def top_level_names(tree: ast.Module) -> set[str]:
    """The names a module defines itself (functions, classes, assignments, also under a top-level if/try)."""
    out = set()
    for node in tree.body:
        for n in [node, *ast.walk(node)] if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                for target in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    out |= {x.id for x in ast.walk(target) if isinstance(x, ast.Name)}
    return out


def imports_through_another_module(sources: dict[str, str], modules: dict[str, set[str]]) -> list[str]:
    """`file:line module.name` for each `from sftmix.x import name` (x not the root) where x does not define name."""
    found = []
    for where, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in modules \
                    and node.module != "sftmix":
                found += [f"{where}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name not in modules[node.module] and f"{node.module}.{a.name}" not in modules]
    return found


def test_the_checker_sees_an_import_through_another_module():
    modules = {"sftmix.a": {"f"}, "sftmix.b": {"g"}, "sftmix.b.c": set()}
    sources = {"x.py": "from sftmix.b import g, f\nfrom sftmix.a import f\nfrom sftmix.b import c\n"}
    assert imports_through_another_module(sources, modules) == ["x.py:1 sftmix.b.f"]
    assert "confidence" in top_level_names(ast.parse((PKG / "confidence" / "split.py").read_text(encoding="utf-8")))


def test_names_are_imported_from_their_defining_module():
    modules = {_module_name(p): top_level_names(ast.parse(p.read_text(encoding="utf-8"))) for p in PKG.rglob("*.py")}
    files = [p for d in ("sftmix", "tests", "benchmarks", "examples") for p in (ROOT / d).rglob("*.py")]
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}
    found = imports_through_another_module(sources, modules)
    assert not found, "import each name from the module that defines it (re-exports: sftmix/__init__.py only): " + \
        "; ".join(found)
