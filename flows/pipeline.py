"""Prefect flow over the same stage functions that ``dvc.yaml`` calls through ``cpet <stage>``.

Run once:       python flows/pipeline.py run [--set recover.train.steps=10 ...] [--stages validate ...]
Serve nightly:  python flows/pipeline.py serve [--cron "0 2 * * *"]   (against PREFECT_API_URL; README)

Same code, same artifacts: the flow and ``dvc repro`` both iterate over ``cpet.stages.ORDER`` and
call ``cpet.stages.STAGES[name]`` (which also opens the stage's MLflow run, tagged with this flow
run's id) with params loaded from the same ``params.yaml``. A stage that fans out (one output per
compression method or task) runs one Prefect task per item on the chosen task runner: threads
here, Dask or Ray on a cluster (``task_runner="dask"|"ray"``, the optional ``cluster`` extra).
Only the stages that can fail transiently retry: ``fetch`` (package downloads) and ``register``
(the MLflow server).

As reproducible as ``dvc repro``: ``overrides`` (``{"recover.train.steps": 10}``) are written to
params.yaml as ``dvc exp run -S`` does (existing keys only, validated first), and after each
stage the flow runs ``dvc commit -f`` on the stage instances it ran, so
``dvc.lock`` records params, dependency and output hashes exactly as ``dvc repro`` would. After a
flow run ``dvc status`` is clean and ``git diff params.yaml dvc.lock`` is the run's lineage
(in a git work tree the flow also keeps it as DVC experiment ``flow-<run name>``, ``dvc exp
save``). Why not run ``dvc exp run`` itself: DVC runs one
stage command at a time under its repository lock, which would serialise the fan-out.
"""

# No `from __future__ import annotations`: a served run loads this file by path and Prefect builds
# the parameter model (the Literal choices the UI shows) from the real annotations.
import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cpet.config import load_params
from cpet.env import apply_quiet_defaults
from cpet.errors import ConfigError, CpetError
from cpet.stages import ORDER, STAGES

RETRIES = {"fetch": 2, "register": 2}  # the stages that touch the network; the rest fail for real
RUNNERS = {"dask": ("prefect_dask", "DaskTaskRunner", "cluster"), "ray": ("prefect_ray", "RayTaskRunner", "ray")}


def make_runner(kind: str, address: str | None = None, max_workers: int | None = None):
    """ThreadPoolTaskRunner, or a cluster runner from the optional ``cluster`` extra (imported lazily)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind not in RUNNERS:
        raise CpetError(f"task_runner {kind!r}: choose threads, dask or ray")
    module, cls, extra = RUNNERS[kind]
    try:
        runner = getattr(__import__(module), cls)
    except ImportError:
        raise CpetError(f"task_runner {kind!r} needs {module.replace('_', '-')}: "
                        f"pip install -e '.[{extra}]'") from None
    if __name__ != "__main__" and sys.modules.get(__name__) is not None:
        # Imported by path under some name (a served deployment), this file is not importable on a
        # cluster's workers: ship its functions by value, as cloudpickle does for a script's __main__.
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return runner(address=address) if address else runner()


def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Write ``overrides`` (``{"dotted.key": value}``) into params.yaml, as ``dvc exp run -S`` does.

    Same rule as DVC's: only existing keys, the file is rewritten in place (comments kept) and
    DVC then locks whatever it holds. Not DVC's own writer (``dvc.utils.hydra.apply_overrides``):
    it re-emits *every* value without its quotes, so ``'no'`` in a verbalizer comes back as a
    YAML 1.1 boolean. Here only the overridden keys change; the result is validated before the
    file is replaced.
    """
    import io

    import yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    from cpet.config import parse_params
    from cpet.io import write_text

    rt = YAML()
    rt.preserve_quotes, rt.width = True, 100
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(params_file.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"overrides: {dotted}: no such key in {params_file.name}")
        node[leaf] = DoubleQuotedScalarString(value) if isinstance(value, str) else value
    buf = io.StringIO()
    rt.dump(data, buf)
    parse_params(yaml.safe_load(buf.getvalue()), f"{params_file.name} with overrides {overrides}")
    write_text(params_file, buf.getvalue())


def dvc_commit(root: Path, instances: list[str]) -> None:
    """Record these stage instances in dvc.lock (params, deps, outs), as ``dvc repro`` would."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", *instances], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CpetError(f"dvc commit {' '.join(instances)}: {last}")


def save_experiment(root: Path, name: str, instances: list[str]) -> str | None:
    """Keep this run's params.yaml/dvc.lock/metrics as DVC experiment ``name`` (``dvc exp show``
    lists it, ``dvc exp apply`` + ``dvc checkout`` restore it); None outside a git work tree."""
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode:
        return None
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-f", "-n", name, *instances], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode:
        last = ((proc.stderr + proc.stdout).strip().splitlines() or ["(no output)"])[-1]
        raise CpetError(f"dvc exp save -n {name}: {last}")
    return name


def _dask_worker_threads() -> int | None:
    """Torch threads for a task on a Dask worker: the worker's ``threads`` resource when it declares
    one (``dask worker --nthreads 1 --resources threads=8``: one task at a time, 8 cores to torch),
    else its thread count (``--nthreads 2``: two tasks at a time, so 2 cores between them is what the
    worker was given). None outside a Dask worker (threads runner: torch keeps its setting)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return max(1, int(worker.state.total_resources.get("threads", worker.state.nthreads)))


def _run_stage(params, root: str, name: str, item: str | None = None) -> dict:
    """Run the stage as ``dvc repro`` does: in the project root, with root ``.`` (paths that end up
    inside artifacts, e.g. a peft adapter's ``base_model_name_or_path``, are then the same bytes).
    Every task of a flow run shares its root, so the process-wide chdir agrees across threads; on
    a Dask worker this runs in the worker's process, so the chdir happens there (the root must be
    the same path on every worker: one machine, or a shared file system).

    Fan-out items on one machine must not fight for its cores: torch's default is every core per
    process, and two such processes training side by side on 2 cores run slower than one after
    the other. On a Dask worker torch gets the threads the worker was given (see above)."""
    threads = _dask_worker_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    stage = STAGES[name]
    os.chdir(root)
    return stage(params, Path("."), **({stage.fan_out: item} if item is not None else {}))


def _link_mlflow_runs(params, root: Path) -> None:
    """A markdown artifact on this flow run listing the MLflow runs its stages logged."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    if not params.track.enabled or not flow_run.id:
        return
    from cpet.tracking.runs import runs_of_flow

    rows = runs_of_flow(params, root, str(flow_run.id))
    table = ["| stage run | MLflow run id | status |", "|---|---|---|"]
    table += [f"| {r['name']} | `{r['run_id']}` | {r['status']} |" for r in rows]
    create_markdown_artifact("\n".join(table), key="mlflow-runs",
                             description=f"MLflow runs of this flow run (experiment {params.track.experiment})")


@flow(name="cpet-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", root: str = ".", stages: list[str] | None = None,
             overrides: dict[str, Any] | None = None,
             task_runner: Literal["threads", "dask", "ray"] = "threads",
             cluster_address: str | None = None, max_workers: int | None = None,
             record_lineage: bool = True) -> dict:
    """Run the selected stages (default: all, in DVC order); a failing stage stops the flow.

    ``record_lineage`` (when ``root`` is a DVC project) commits each stage to dvc.lock and, in a
    git work tree, saves the run as DVC experiment ``flow-<flow run name>``.
    """
    base = Path(root).resolve()
    if overrides:
        apply_overrides(base / params_path, overrides)
    params = load_params(base / params_path)
    unknown = sorted(set(stages or []) - set(ORDER))
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; choose from {list(ORDER)}")
    selected = [s for s in ORDER if stages is None or s in stages]
    lineage = record_lineage and (base / ".dvc").is_dir()
    cwd = os.getcwd()  # stages chdir into the root (see _run_stage); the caller gets its cwd back
    try:
        results, ran = _run_all(params, base, selected, lineage, task_runner, cluster_address, max_workers)
    finally:
        os.chdir(cwd)
    if lineage:
        from prefect.runtime import flow_run

        saved = task(save_experiment, name="dvc-exp-save", cache_policy=NO_CACHE)(base, f"flow-{flow_run.name}", ran)
        if saved:
            print(f"DVC experiment {saved}: dvc exp show / dvc exp apply {saved}")
    _link_mlflow_runs(params, base)
    return results


def _run_all(params, base: Path, selected: list[str], lineage: bool, task_runner, cluster_address,
             max_workers) -> tuple[dict, list[str]]:
    """Each selected stage in order, its items fanned out on the task runner."""
    results: dict = {}
    ran: list[str] = []  # stage instances, as dvc.lock names them
    with make_runner(task_runner, cluster_address, max_workers) as runner:
        for name in selected:
            stage = STAGES[name]
            items = stage.items(params) if stage.fan_out else [None]
            futures = {
                item: runner.submit(
                    task(_run_stage, name=name, task_run_name=name + (f"[{item}]" if item else ""),
                         cache_policy=NO_CACHE, retries=RETRIES.get(name, 0), retry_delay_seconds=10),
                    {"params": params, "root": str(base), "name": name, "item": item})
                for item in items
            }
            done = {item: fut.result() for item, fut in futures.items()}
            results[name] = done[None] if stage.fan_out is None else done
            names = [name if item is None else f"{name}@{item}" for item in items]
            ran += names
            if lineage:
                task(dvc_commit, name=f"dvc-commit[{name}]", cache_policy=NO_CACHE)(base, names)
    return results, ran


def serve(cron: str, name: str = "nightly", **parameters) -> None:
    """Serve ``pipeline`` as deployment ``cpet-pipeline/<name>`` on ``cron`` (blocks; Ctrl-C stops)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise CpetError("PREFECT_API_URL is not set: start a server (make prefect-server) and "
                        "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    parameters["root"] = str(Path(parameters.get("root", ".")).resolve())
    pipeline.serve(name=name, cron=cron, parameters={k: v for k, v in parameters.items() if v is not None},
                   description="cpet pipeline (same stages as dvc repro), on a schedule")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()
    p = argparse.ArgumentParser(prog="flows/pipeline.py", description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", choices=["run", "serve"], default="run")
    p.add_argument("--root", default=".")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--stages", nargs="+", help="a subset of the stages (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value, as `dvc exp run -S` (repeatable)")
    p.add_argument("--task-runner", default="threads", choices=["threads", "dask", "ray"])
    p.add_argument("--cluster-address", help="Dask scheduler / Ray cluster address")
    p.add_argument("--cron", default=os.environ.get("CPET_CRON", "0 2 * * *"), help="serve: schedule")
    p.add_argument("--name", default="nightly", help="serve: deployment name")
    args = p.parse_args(argv)
    try:
        parameters = dict(params_path=args.params, root=args.root, stages=args.stages,
                          overrides=_overrides(args.overrides) or None, task_runner=args.task_runner,
                          cluster_address=args.cluster_address)
        if args.command == "serve":
            serve(args.cron, args.name, **parameters)
        else:
            pipeline(**parameters)
    except CpetError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
