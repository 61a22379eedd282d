"""The Prefect flow on a real Dask cluster (2 worker processes) gives dvc repro's artifacts."""

import shutil

import pytest
import yaml

from test_flow import ROOT, _dvc, _flow, _git, _lock_outs, harness  # noqa: F401 (harness: a fixture)

distributed = pytest.importorskip("distributed")  # the `cluster` extra, in requirements/cpu.lock


def test_flow_on_dask_cluster_matches_dvc_repro(harness, tiny_project, monkeypatch):  # noqa: F811
    import os

    import torch

    root, params = tiny_project
    raw = params.model_dump(by_alias=True, mode="json")
    assert sorted(raw["compress"]["methods"]) == ["int8", "struct"]  # two items: one per worker
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))  # code deps
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    _dvc(root, "repro", "-s", "validate", "compress@int8", "compress@struct")
    by_dvc = {k: v for k, v in _lock_outs(root).items() if ":models/" in k}  # reports hold timings
    assert set(by_dvc) == {"compress@int8:models/compressed/int8", "compress@struct:models/compressed/struct"}
    shutil.rmtree(root / "models/compressed")  # the workers must write them again

    # workers are other processes: they import cpet from the same place this process does
    cwd = os.getcwd()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.run(torch.set_num_threads, 3)  # what a task must replace with the worker's 1 thread
        result = _flow()(root=str(root), stages=["validate", "compress"], task_runner="dask",
                         cluster_address=cluster.scheduler_address)
        workers = client.run(lambda: (os.getcwd(), __import__("torch").get_num_threads(), os.getpid()))
    assert result["validate"]["success"] is True and set(result["compress"]) == {"int8", "struct"}
    # each worker ran a task (the chdir into the root happened in its own process), with 1 torch thread
    assert len(workers) == 2 and {pid for _, _, pid in workers.values()}.isdisjoint({os.getpid()})
    assert all(cwd == str(root) and threads == 1 for cwd, threads, _ in workers.values()), workers
    assert os.getcwd() == cwd  # the flow's own process keeps its cwd
    assert {k: v for k, v in _lock_outs(root).items() if ":models/" in k} == by_dvc  # byte-identical
    assert "up to date" in _dvc(root, "status", "validate", "compress@int8", "compress@struct")
