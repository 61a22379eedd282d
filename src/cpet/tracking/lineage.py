"""Where a stage run came from, read from the files DVC and git already keep (no mlflow here).

``dvc.yaml`` is the one stage graph: it says which params sections a stage reads, which report
files it writes and which upstream stage instances (``compress@int3``) produced its inputs.
``dvc.lock`` holds the hashes of those inputs. Both ``dvc repro`` and the Prefect flow lock every
stage right after it runs (the flow through ``dvc commit``), so when a stage starts, the lock
entries of its *upstream* stages describe exactly the inputs it is about to read. The stage's own
entry is stale at that point (it is rewritten after the stage), so it is not used.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Files the pipeline itself rewrites while it runs: changes there do not make the code "dirty".
PIPELINE_WRITTEN = ("dvc.lock", "reports/")


@dataclass(frozen=True)
class StageSpec:
    """One stage instance of dvc.yaml (``name`` or ``name@item``), ``${key}`` substituted."""

    name: str
    item: str | None
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    @property
    def lock_name(self) -> str:
        return self.name if self.item is None else f"{self.name}@{self.item}"

    @property
    def reports(self) -> tuple[str, ...]:
        """Report files and folders: metrics plus outputs under ``reports/`` (plots included)."""
        return tuple(dict.fromkeys([*self.metrics, *(o for o in self.outs if o.startswith("reports/"))]))


@dataclass
class Graph:
    """Every stage instance of a project's dvc.yaml, expanded over its ``foreach`` items."""

    specs: list[StageSpec] = field(default_factory=list)

    def select(self, name: str, item: str | None) -> list[StageSpec]:
        """The instances a run of ``name`` covers: one item, or all of them when ``item`` is None."""
        return [s for s in self.specs if s.name == name and (item is None or s.item in (None, item))]

    def upstream(self, spec: StageSpec) -> list[StageSpec]:
        """Stage instances whose outputs this one reads (a dep equal to, inside or above an out)."""
        return [s for s in self.specs if s.name != spec.name
                and any(_overlap(d, o) for d in spec.deps for o in (*s.outs, *s.metrics))]


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _paths(entries: list) -> tuple[str, ...]:
    """dvc.yaml lists paths as strings or one-key mappings (``{path: {cache: false}}``)."""
    return tuple(e if isinstance(e, str) else next(iter(e)) for e in entries or [])


def _lookup(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def load_graph(root: Path, params: dict) -> Graph | None:
    """The expanded stage graph of ``root/dvc.yaml`` (None without one); ``params`` resolves
    ``foreach: ${section.key}`` to that mapping's keys, as DVC does."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return None
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    graph = Graph()
    for name, body in stages.items():
        if "foreach" in body:
            source = body["foreach"]
            if isinstance(source, str) and source.startswith("${"):
                source = _lookup(params, source[2:-1])
            items = list(source)
            body = body["do"]
        else:
            items = [None]
        for item in items:
            sub = (lambda s: s) if item is None else (lambda s, i=item: s.replace("${key}", str(i)))
            graph.specs.append(StageSpec(
                name, item,
                deps=tuple(sub(p) for p in _paths(body.get("deps"))),
                params=tuple(sub(p) for p in _paths(body.get("params"))),
                outs=tuple(sub(p) for p in (*_paths(body.get("outs")), *_paths(body.get("plots")))),
                metrics=tuple(sub(p) for p in _paths(body.get("metrics"))),
            ))
    return graph


def lock_hashes(root: Path, specs: list[StageSpec]) -> dict[str, str]:
    """``{out path: md5}`` of these stage instances' outputs as recorded in ``dvc.lock``."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    lock = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    out = {}
    for spec in specs:
        for entry in lock.get(spec.lock_name, {}).get("outs", []):
            if entry.get("md5"):
                out[entry["path"]] = entry["md5"]
    return out


def git_state(root: Path) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}``; empty outside a git work tree.

    "dirty" ignores files the pipeline rewrites itself (``dvc.lock``, ``reports/``): a run in a
    clean checkout must not call itself dirty because an earlier stage updated its report.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".").splitlines()
        top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        return {}
    here = Path(root).resolve().relative_to(top).as_posix()
    prefix = "" if here == "." else here + "/"
    dirty = [c for c in changed if not c[3:].removeprefix(prefix).startswith(PIPELINE_WRITTEN)]
    return {"commit": commit, "dirty": "true" if dirty else "false"}
