"""The Prefect flow runs the stage functions; a failed data gate stops the flow."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tinyproject import make_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def _module():
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "flows" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flow():
    return _module().pipeline


def test_task_runners_threads_here_cluster_runners_optional():
    from prefect.task_runners import ThreadPoolTaskRunner

    from cpet.errors import CpetError

    mod = _module()
    assert isinstance(mod.make_runner("threads"), ThreadPoolTaskRunner)
    for kind, extra in (("dask", "cluster"), ("ray", "ray")):
        if importlib.util.find_spec(f"prefect_{kind}") is None:  # the optional `cluster` extra
            with pytest.raises(CpetError, match=rf"task_runner '{kind}' needs prefect-{kind}: pip install -e '.\[{extra}\]'"):
                mod.make_runner(kind)
    assert mod.RETRIES == {"fetch": 2, "register": 2}  # only the stages that touch the network


def test_flow_validates_and_stops_on_bad_data(harness, tiny_task, raw_params, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw_params["tasks"] = {"tiny": {"source": "topic", "template": "{text} =", "verbalizer": {"neg": " no", "pos": " yes"}, "scoring": "auto"}}
    raw_params["track"]["enabled"] = True  # to sqlite:///mlflow.db in the root
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    root = tiny_task()
    pipeline = _flow()
    state = pipeline(root=str(root), stages=["validate"], return_state=True)
    assert state.result()["validate"]["success"] is True
    # the stage's MLflow run (params.yaml tracks to root/mlflow.db) links back to this flow run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cpet").experiment_id])
    assert run.info.run_name == "validate"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)

    bad = {s: make_rows("neg", 12, s) + make_rows("pos", 12, s) for s in ("train", "validation", "test")}
    bad["test"][0]["label"] = "other"
    tiny_task(bad)
    state = pipeline(root=str(root), stages=["validate"], return_state=True)
    assert state.is_failed()
    assert "tiny/test: expect_column_values_to_be_in_set" in str(state.result(raise_on_failure=False))


def _dvc(root: Path, *args: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `cpet` for dvc repro
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _lock_outs(root: Path) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {f"{name}:{o['path']}": o["md5"] for name, entry in lock.items() for o in entry.get("outs", [])}


def _git(root: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_flow_matches_dvc_repro_and_locks_its_overrides(harness, tiny_project, monkeypatch):
    """dvc repro and the flow give the same artifacts; the flow's overrides land in dvc.lock."""
    import json
    import shutil

    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "cpet test")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "test@cpet.invalid")
    root, params = tiny_project
    raw = params.model_dump(by_alias=True, mode="json")
    # two methods: the flow trains their recover runs side by side in threads (the RNG hazard);
    # LoRA dropout on, so the training RNG stream matters to the bytes
    raw["compress"]["methods"] = {"int8": {"method": "int8"}, "int8x": {"method": "int8", "exclude": ["*.o_proj"]}}
    raw["teacher"]["lora"]["dropout"] = 0.1
    raw["recover"]["variants"] = ["compressed+pet", "compressed+cpet"]
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))  # code deps
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")

    trained = ("teacher@tiny", "inherit@int8", "inherit@int8x", "recover@int8", "recover@int8x")
    _dvc(root, "repro", "-s", "validate", "compress@int8", "compress@int8x", *trained)
    by_dvc = _lock_outs(root)
    shutil.rmtree(Path(params.fetch.cache_dir) / "checkpoints")  # the flow must train, not resume
    report_dvc = json.loads((root / "reports/compress/int8.json").read_text())
    assert "compress@int8:models/compressed/int8" in by_dvc

    result = _flow()(root=str(root), stages=["validate", "compress", "teacher", "inherit", "recover"])
    assert result["compress"]["int8"]["int8"]["size_ratio"] == report_dvc["size_ratio"]

    def untimed(outs):  # reports hold wall-clock timings; the compress report is compared by field below
        return {k: v for k, v in outs.items() if ":reports/" not in k}
    assert any(k.startswith("recover@int8x:models/") for k in by_dvc)
    assert untimed(_lock_outs(root)) == untimed(by_dvc)  # adapters and bundles byte-identical
    report_flow = json.loads((root / "reports/compress/int8.json").read_text())
    for key in ("size_ratio", "summary", "config"):
        assert report_flow[key] == report_dvc[key]
    assert report_flow["after"]["tasks"] == report_dvc["after"]["tasks"]
    assert "up to date" in _dvc(root, "status", "validate", "compress@int8", *trained)

    # an override is applied as `dvc exp run -S` would and recorded in dvc.lock: `dvc status` stays
    # clean, and the run is kept as a DVC experiment
    (root / ".gitignore").write_text("/models/base\n/data/processed\n/.cache\n")  # fetch's outputs: DVC's, not git's
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "tiny project")
    _flow()(root=str(root), stages=["validate"], overrides={"validate.min_per_class": 5})
    assert [x for x in _dvc(root, "exp", "list", "--name-only").split() if x.startswith("flow-")]
    assert yaml.safe_load((root / "params.yaml").read_text())["validate"]["min_per_class"] == 5
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["validate"]
    assert lock["params"]["params.yaml"]["validate"]["min_per_class"] == 5
    assert "up to date" in _dvc(root, "status", "validate")
    state = _flow()(root=str(root), stages=["validate"], overrides={"validate.no_such_key": 1}, return_state=True)
    assert state.is_failed() and "validate.no_such_key" in str(state.result(raise_on_failure=False))
