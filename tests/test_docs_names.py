"""Every dotted `sftmix.x.y` name in the docs (README.md, docs/*.md) and in the package's own docstrings and comments
names something that exists, in the module that defines it: when a function moves or is renamed, the prose that
points at it fails here instead of drifting. Read with `ast`, so optional extras (axolotl) need not be installed."""

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sftmix"
DOTTED = re.compile(r"(?<![\w./-])sftmix(?:\.[A-Za-z_]\w*)+")
IMPORT_LINE = re.compile(r"\bfrom (sftmix(?:\.\w+)*) import \(?((?:\w+(?: as \w+)?(?:, *)?)+)")
# `sftmix.yaml`, `sftmix.log`: file names that happen to start with the package's name
FILE_SUFFIXES = {"yaml", "yml", "sbatch", "log", "json", "jsonl", "md", "html", "txt", "py", "toml", "egg"}
# Stale names known today in files another branch of issue 26 rewrites; the lead empties this after merging. Nothing
# may be added: a new stale name is a doc to correct.
KNOWN_STALE: set[str] = set()


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _defined(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines itself (also under a top-level if/try): name -> node."""
    out = {}
    for node in body:
        for n in [node, *ast.walk(node)] if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[n.name] = n
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                for target in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    out.update({x.id: n for x in ast.walk(target) if isinstance(x, ast.Name)})
    return out


def _lazy_root_names() -> set[str]:
    """The names `sftmix/__init__.py` re-exports (its _LAZY table) plus those it defines."""
    tree = _tree(PKG / "__init__.py")
    names = set(_defined(tree.body))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            names |= {k.value for k in node.value.keys}
    return names


def resolve(dotted: str) -> str | None:
    """None if `dotted` names a module, or something its module defines (a class's attribute too); else why not."""
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES and len(parts) == 2:
        return None
    cut = max(i for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i])))
    module, rest = ".".join(parts[:cut]), parts[cut:]
    if not rest:
        return None
    if module == "sftmix":
        return None if rest[0] in _lazy_root_names() and len(rest) == 1 else f"sftmix has no `{rest[0]}`"
    scope = _defined(_tree(_module_file(module)).body)
    for i, name in enumerate(rest):
        where = ".".join([module, *rest[:i]])
        if name not in scope:
            return f"{where} defines no `{name}`"
        node = scope[name]
        if i + 1 < len(rest):
            if not isinstance(node, ast.ClassDef):
                return f"{where}.{name} is not a class, so has no `{rest[i + 1]}`"
            scope = _defined(node.body)
    return None


def dotted_names(text: str) -> set[str]:
    return {m.group(0).rstrip(".") for m in DOTTED.finditer(text)}


def imported_names(text: str) -> set[str]:
    """`sftmix.m.name` for each name of each `from sftmix.m import name, ...` line in `text` (usage lines in
    docstrings and docs, code run in a subprocess); a module imported by name is `sftmix.m.sub`."""
    return {f"{m.group(1)}.{n.split(' as ')[0].strip()}" for m in IMPORT_LINE.finditer(text)
            for n in m.group(2).split(",") if n.strip()}


def _sources(*folders: str) -> dict[str, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(PKG.rglob("*.py"))]
    files += [p for d in folders for p in sorted((ROOT / d).rglob("*.py"))]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}


def test_the_resolver_refuses_what_does_not_exist():
    assert resolve("sftmix.mixup.loss.mixup_loss") is None
    assert resolve("sftmix.confidence.split") is None  # a module
    assert resolve("sftmix.SFTMixTrainer") is None  # the root's lazy re-export
    assert resolve("sftmix.rundir.Fingerprints.refresh") is None  # a method
    assert resolve("sftmix.config.yaml") == "sftmix.config defines no `yaml`"  # only `sftmix.yaml` is a file name
    assert resolve("sftmix.yaml") is None
    assert resolve("sftmix.mixup.loss.no_such_function") == "sftmix.mixup.loss defines no `no_such_function`"
    assert resolve("sftmix.dynamics.run_reference") == "sftmix has no `dynamics`"  # a module that moved
    assert "is not a class" in resolve("sftmix.mixup.loss.mixup_loss.x")
    assert dotted_names("see `sftmix.rundir.RunLock`. And sftmix.cli.") == {"sftmix.rundir.RunLock", "sftmix.cli"}
    assert dotted_names("python -m sftmix.evaluate, tests/sftmix.x, a/sftmix.b") == {"sftmix.evaluate"}
    lines = "    from sftmix.confidence.split import confidence, split_confident as sc\nfrom sftmix import rundir\n"
    assert imported_names(lines) == {"sftmix.confidence.split.confidence", "sftmix.confidence.split.split_confident",
                                     "sftmix.rundir"}
    assert resolve("sftmix.rundir") is None and resolve("sftmix.mixup.trainer.median_split") is not None


def test_every_sftmix_name_in_the_docs_and_docstrings_exists():
    stale = {f"{where}: {name}": why for where, text in _sources().items()
             for name in sorted(dotted_names(text)) if (why := resolve(name))}
    new = [f"{k} ({why})" for k, why in stale.items() if k not in KNOWN_STALE]
    assert not new, "names that no longer exist (moved or renamed?):\n" + "\n".join(new)
    gone = sorted(KNOWN_STALE - set(stale))
    assert not gone, f"KNOWN_STALE lists names that are no longer stale; remove them: {gone}"


def test_every_import_line_in_the_docs_docstrings_and_subprocess_code_names_the_defining_module():
    checkers = {"tests/test_architecture.py", "tests/test_docs_names.py"}  # their fake examples are meant to fail
    stale = [f"{where}: {name} ({why})" for where, text in _sources("tests", "benchmarks", "examples").items()
             if where not in checkers for name in sorted(imported_names(text)) if (why := resolve(name))]
    assert not stale, "imports of names that are not defined there:\n" + "\n".join(stale)
