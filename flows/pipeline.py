"""Prefect flow over the same stage functions that ``dvc.yaml`` calls through ``cpet <stage>``.

Run once:        python flows/pipeline.py
The flow and ``dvc repro`` cannot drift apart: both iterate over ``cpet.stages.ORDER`` and call
``cpet.stages.STAGES[name]`` with the params loaded from the same ``params.yaml``. A stage that
fans out (one output per compression method) runs one Prefect task per item, concurrently on the
flow's task runner (threads here; a Dask or Ray task runner on a cluster).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cpet.config import load_params
from cpet.env import apply_quiet_defaults
from cpet.stages import ORDER, STAGES


@flow(name="cpet-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", root: str = ".", stages: list[str] | None = None) -> dict:
    """Run the selected stages (default: all, in DVC order); a failing stage stops the flow."""
    params = load_params(Path(root) / params_path)
    selected = [s for s in ORDER if stages is None or s in stages]
    results = {}
    for name in selected:
        stage = STAGES[name]
        if stage.fan_out is None:
            results[name] = task(stage.fn, name=name, cache_policy=NO_CACHE)(params, Path(root))
            continue
        futures = {
            item: task(stage.fn, name=f"{name}[{item}]", cache_policy=NO_CACHE).submit(
                params, Path(root), **{stage.fan_out: item}
            )
            for item in stage.items(params)
        }
        results[name] = {item: fut.result() for item, fut in futures.items()}
    return results


if __name__ == "__main__":
    apply_quiet_defaults()
    pipeline()
