"""Each stage's code dependencies, derived from its imports, and ``dvc.yaml`` kept in line with them.

DVC reruns a stage when one of its ``deps`` changes, so a stage must list every source file its
result depends on. Hand-written lists drift (a shared helper module nobody listed); here they are
computed: the import closure of ``cpet.stages.<name>`` over the ``cpet`` package, every
``import``/``from ... import`` statement counted, including the ones inside functions (lazy
imports run too). Three edges are not followed, each for a reason:

* ``cpet.stages`` (the package ``__init__``) is the stage registry: it imports every stage, but a
  stage does not depend on the others. The file itself is listed (``Stage.__call__`` runs there).
* ``cpet.cli`` dispatches to the stage; listed, not followed, for the same reason.
* ``cpet.config`` validates method configs by importing ``cpet.compress`` lazily: validation,
  not a stage's computation (the compress stage imports ``cpet.compress`` itself).

A stage that runs a module in a subprocess names it in :data:`SUBPROCESS`. ``cpet stage-deps``
prints the derived lists; ``cpet stage-deps --write`` rewrites the ``src/`` entries of each
stage's ``deps`` in ``dvc.yaml`` (comments and everything else kept); a test fails when they differ.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

PACKAGE = "cpet"
LISTED_NOT_FOLLOWED = ("cpet.stages", "cpet.cli")
NOT_FOLLOWED_LAZY = ("cpet.config",)  # function-level imports of these packages are not followed
SUBPROCESS: dict[str, tuple[str, ...]] = {"bench": ("cpet.serve",)}  # `python -m` by the stage


def _source_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations)))


def _module_file(module: str) -> Path | None:
    """The file of ``cpet.x.y`` (module or package ``__init__``), or None if there is none."""
    base = _source_root().parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """``cpet`` modules ``module`` imports (absolute names; ``from a import b`` counts a.b when b is a module)."""
    path = _module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    lazy_ok = not module.startswith(NOT_FOLLOWED_LAZY)
    top_level = {id(n) for n in tree.body}
    out: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if not lazy_ok and id(node) not in top_level:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:  # relative import
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        out.update(n for n in names if (n == PACKAGE or n.startswith(PACKAGE + ".")) and _module_file(n))
    return out


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def closure(module: str) -> frozenset[str]:
    """Every ``cpet`` module that importing and running ``module`` may execute."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        for name in _with_parents(m):
            if name in seen:
                continue
            seen.add(name)
            if name not in LISTED_NOT_FOLLOWED or name == module:
                todo.extend(_imports(name))
    return frozenset(seen)


def stage_files(stage: str) -> set[Path]:
    """Source files (relative to the project root) that stage ``stage``'s result depends on."""
    modules = set(closure(f"{PACKAGE}.stages.{stage}")) | {f"{PACKAGE}.cli"}
    for extra in SUBPROCESS.get(stage, ()):
        modules |= closure(extra)
    project = _source_root().parents[1]
    return {_module_file(m).relative_to(project) for m in modules}


def dvc_code_deps(stage: str) -> list[str]:
    """``stage_files`` as dvc.yaml entries: a folder where every source file under it is needed."""
    files = stage_files(stage)
    project = _source_root().parents[1]

    def whole(folder: Path) -> bool:
        return all(f.relative_to(project) in files for f in (project / folder).rglob("*.py"))

    entries: set[str] = set()
    for f in files:
        top = f
        for parent in f.parents:
            if parent == Path("src") / PACKAGE or parent == Path("src") or parent == Path("."):
                break
            if whole(parent):
                top = parent
        entries.add(top.as_posix())
    return sorted(entries)


def is_code_dep(dep: str) -> bool:
    return dep.startswith(f"src/{PACKAGE}")


def sync_dvc_yaml(path: str | Path = "dvc.yaml", write: bool = False) -> dict[str, tuple[list[str], list[str]]]:
    """Stages whose listed code deps differ from the derived ones: name -> (listed, derived).
    With ``write``, replace the listed ones in place (data deps, comments and order kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = Path(path)
    doc = yaml.load(path.read_text())
    drift = {}
    for name, entry in doc["stages"].items():
        body = entry.get("do", entry)
        deps = body.setdefault("deps", [])
        listed = [d for d in deps if is_code_dep(str(d))]
        derived = dvc_code_deps(name)
        if listed != derived:
            drift[name] = (listed, derived)
            if write:
                data = [d for d in deps if not is_code_dep(str(d))]
                deps.clear()
                deps.extend(data + derived)
    if write and drift:
        from io import StringIO

        buf = StringIO()
        yaml.dump(doc, buf)
        from cpet.io import write_text

        write_text(path, buf.getvalue())
    return drift
