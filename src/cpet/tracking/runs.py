"""One MLflow run per stage run, whoever runs the stage (``cpet <stage>`` under DVC, or a Prefect task).

A run is named ``<stage>`` or ``<stage>[<item>]`` and logs:

- params: the params.yaml sections the stage reads (its ``params:`` in dvc.yaml), flattened with ``.``;
- metrics: the numeric leaves of the dict the stage returns, flattened with ``/``;
- artifacts: the stage's report files (its dvc.yaml metrics and ``reports/`` outputs), under ``reports/``;
- tags: ``cpet.stage``, ``cpet.item``, the git commit (+ ``git.dirty``), ``dvc.in.<path>`` = the
  dvc.lock md5 of every input an upstream stage produced, ``upstream.<stage>[:<item>]`` = the latest
  finished run of each upstream stage instance, and inside a Prefect flow the flow run's id and URL.

The run is FAILED (with an ``error`` tag) when the stage raises; reports it wrote are still logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cpet.errors import CpetError
from cpet.tracking.lineage import StageSpec, git_state, load_graph, lock_hashes

_BAD_KEY = re.compile(r"[^\w./ :-]")
_lock = threading.Lock()
_ready: set[str] = set()  # URIs whose database exists: created once per process, not per thread


def resolve_uri(track, root: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``track.tracking_uri``; a relative sqlite path is
    taken relative to the project root (so ``mlflow ui`` in the root finds the same database)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or track.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((Path(root) / uri[len(prefix):]).resolve())
    return uri


def artifact_location(uri: str, root: str | os.PathLike) -> str | None:
    """Artifacts of a local sqlite store go to ``<root>/mlartifacts`` (not the caller's cwd);
    a tracking server chooses its own."""
    return (Path(root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def connect(uri: str):
    """An ``MlflowClient`` for ``uri``; an unreachable server is one clear CpetError line.

    HTTP servers are probed once with a short timeout first: MLflow's own client retries a dead
    server with exponential backoff for minutes before it gives up.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise CpetError(f"tracking: cannot reach the MLflow server at {uri} ({reason}); "
                            "start it, fix MLFLOW_TRACKING_URI / track.tracking_uri, or set track.enabled: false") from None
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with _lock:
        if uri not in _ready:
            try:
                client.search_experiments(max_results=1)  # creates/migrates a sqlite database
            except MlflowException as err:
                raise CpetError(f"tracking: {uri}: {str(err).splitlines()[0]}") from None
            _ready.add(uri)
    return client


def experiment_id(client, name: str, location: str | None) -> str:
    """The experiment's id, created on first use (two threads may race to create it)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def key(name: str) -> str:
    """An MLflow-safe param/metric/tag key (``compressed+cpet`` -> ``compressed_cpet``)."""
    return _BAD_KEY.sub("_", name)


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Leaves of nested dicts/lists as ``{"a.b.0": leaf}``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    return out


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Numeric (and boolean, as 0/1) leaves of a stage's returned dict, keys joined with ``/``."""
    return {key(k): float(v) for k, v in flatten(metrics, sep="/").items()
            if isinstance(v, (int, float)) and v == v}  # v == v drops NaN


def _params_of(dump: dict, keys: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for dotted in keys:
        node = dump
        try:
            for part in dotted.split("."):
                node = node[part]
        except (KeyError, TypeError):
            continue
        for k, v in flatten({dotted: node}).items():
            out[key(k)] = str(v)[:6000]  # MLflow's param value limit
    return out


def _prefect_tags() -> dict[str, str]:
    """The enclosing Prefect flow run, if any (prefect is only looked at when already imported)."""
    if "prefect" not in sys.modules:
        return {}
    from prefect.runtime import flow_run, task_run

    if not flow_run.id:
        return {}
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if task_run.id:
        tags["prefect.task_run_id"] = str(task_run.id)
    with contextlib.suppress(Exception):  # the UI URL needs PREFECT_UI_URL; optional
        if flow_run.ui_url:
            tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


def _upstream_runs(client, exp_id: str, upstream: list[StageSpec]) -> dict[str, str]:
    """``{"upstream.<stage>[:<item>]": run_id}``: each upstream instance's latest finished run
    (a run over all items of a stage, item "", also counts)."""
    tags = {}
    for name in dict.fromkeys(s.name for s in upstream):
        runs = client.search_runs([exp_id], f"tags.`cpet.stage` = '{name}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=100)
        for spec in (s for s in upstream if s.name == name):
            for run in runs:
                if run.data.tags.get("cpet.item", "") in ("", spec.item or ""):
                    tags[key(f"upstream.{name}" + (f":{spec.item}" if spec.item else ""))] = run.info.run_id
                    break
    return tags


def _log_reports(client, run_id: str, root: Path, reports: list[str]) -> None:
    for rel in reports:
        path = root / rel
        parent = str(Path(rel).parent)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=rel)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=parent)


CURVES = "reports/curves/"


def curve_metrics(root: Path, reports: list[str]) -> list:
    """Learning curves among ``reports`` (JSON lists of per-step entries) as MLflow step metrics
    ``curve/<path under reports/curves>/<field>``, e.g. ``curve/recover/int3/sentiment/compressed_cpet/kl``."""
    import json

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for rel in reports:
        if not rel.startswith(CURVES):
            continue
        path = root / rel
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            name = f.relative_to(root / CURVES).with_suffix("").as_posix()
            for entry in json.loads(f.read_text()):
                for field, value in entry.items():
                    if field != "step" and isinstance(value, (int, float)) and value == value:
                        out.append(Metric(key(f"curve/{name}/{field}"), float(value), now, int(entry["step"])))
    return out


class StageRun:
    """The live run a stage logs into; ``finish(metrics)`` records what the stage returned."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def finish(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in numeric_metrics(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])


@contextlib.contextmanager
def stage_run(params, root: str | os.PathLike, stage: str, item: str | None = None) -> Iterator[StageRun | None]:
    """Track one stage run in MLflow (yields None when ``track.enabled`` is false).

    The run is also the thread's active MLflow run, so a stage that logs models (``register``)
    attaches them to it.
    """
    if not params.track.enabled:
        yield None
        return
    import mlflow
    from mlflow.entities import Param, RunTag

    root = Path(root)
    uri = resolve_uri(params.track, root)
    client = connect(uri)
    exp_id = experiment_id(client, params.track.experiment, artifact_location(uri, root))
    dump = params.model_dump(by_alias=True, mode="json")
    graph = load_graph(root, dump)
    specs = graph.select(stage, item) if graph else []
    upstream = list({u.lock_name: u for s in specs for u in graph.upstream(s)}.values()) if graph else []

    tags = {"cpet.stage": stage, "cpet.item": item or "", "cpet.root": str(root.resolve())}
    git = git_state(root)
    if git:
        tags.update({"git.commit": git["commit"], "git.dirty": git["dirty"],
                     "mlflow.source.git.commit": git["commit"]})
    tags.update({key(f"dvc.in.{p}"): md5 for p, md5 in lock_hashes(root, upstream).items()
                 if any(d == p or p.startswith(d.rstrip("/") + "/") or d.startswith(p + "/")
                        for s in specs for d in s.deps)})
    tags.update(_upstream_runs(client, exp_id, upstream))
    tags.update(_prefect_tags())
    sections = tuple(p for s in specs for p in s.params) or (stage,)
    run_params = _params_of(dump, sections)

    mlflow.set_tracking_uri(uri)
    active = mlflow.start_run(experiment_id=exp_id, run_name=stage + (f"[{item}]" if item else ""),
                              nested=mlflow.active_run() is not None)
    run_id = active.info.run_id
    items = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
    plist = [Param(k, v) for k, v in run_params.items()]
    for i in range(0, max(len(items), len(plist)), 100):
        client.log_batch(run_id, params=plist[i : i + 100], tags=items[i : i + 100])
    reports = list(dict.fromkeys(r for s in specs for r in s.reports))
    status = "FINISHED"
    try:
        yield StageRun(client, run_id)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        client.set_tag(run_id, "error", f"{type(err).__name__}: {first}"[:8000])
        raise
    finally:
        try:
            _log_reports(client, run_id, root, reports)
            curves = curve_metrics(root, reports)
            for i in range(0, len(curves), 1000):
                client.log_batch(run_id, metrics=curves[i : i + 1000])
        finally:
            mlflow.end_run(status)


def runs_of_flow(params, root: str | os.PathLike, flow_run_id: str) -> list[dict]:
    """The stage runs a Prefect flow run logged (its ``prefect.flow_run_id`` tag), oldest first."""
    client = connect(resolve_uri(params.track, root))
    exp = client.get_experiment_by_name(params.track.experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return [{"name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status} for r in runs]
