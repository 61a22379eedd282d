"""Every stage run is an MLflow run: params, metrics, report artifacts and lineage tags (real sqlite store)."""

import shutil
from pathlib import Path

import pytest
import yaml

from cpet.config import parse_params
from cpet.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def tracked(params, uri: str):
    """The same params with tracking on, logging to ``uri``."""
    raw = params.model_dump(by_alias=True, mode="json")
    raw["track"] = {"enabled": True, "tracking_uri": uri, "experiment": "cpet"}
    return parse_params(raw)


@pytest.fixture
def project(tiny_project, monkeypatch):
    """tiny_project + the repo's dvc.yaml + a dvc.lock entry for fetch, tracking to root/mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = tiny_project
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    lock = {"schema": "2.0", "stages": {"fetch": {"cmd": "cpet fetch", "outs": [
        {"path": "data/processed", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"},
        {"path": "models/base", "hash": "md5", "md5": "fedcba9876543210fedcba9876543210.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root, tracked(params, "sqlite:///mlflow.db")


def test_stage_runs_log_params_metrics_reports_and_lineage(project):
    from mlflow import MlflowClient

    root, params = project
    STAGES["validate"](params, root)
    STAGES["compress"](params, root, method="int8")

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the relative URI resolved against root
    exp = client.get_experiment_by_name("cpet")
    assert exp.artifact_location == (root / "mlartifacts").as_uri()
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"validate", "compress[int8]"}
    val, comp = runs["validate"], runs["compress[int8]"]
    assert val.info.status == comp.info.status == "FINISHED"

    # params: exactly the sections dvc.yaml lists for the stage, flattened
    assert val.data.params["validate.min_chars"] == str(params.validate_.min_chars)
    assert val.data.params["tasks.tiny.template"] == params.tasks["tiny"].template
    assert comp.data.params["compress.methods.int8.method"] == "int8"
    assert "compress.methods.struct.method" not in comp.data.params  # only this item's method
    # metrics: numeric leaves of the returned dict
    assert val.data.metrics["success"] == 1.0 and val.data.metrics["tasks/tiny/success"] == 1.0
    assert 0 < comp.data.metrics["int8/size_ratio"] < 1
    # artifacts: the stage's reports
    listed = {a.path for a in client.list_artifacts(val.info.run_id, "reports")}
    assert {"reports/validate.json", "reports/validation"} <= listed
    assert [a.path for a in client.list_artifacts(comp.info.run_id, "reports/compress")] == ["reports/compress/int8.json"]
    # lineage: stage/item, input hashes from dvc.lock, the upstream stage's run
    assert val.data.tags["cpet.stage"] == "validate" and comp.data.tags["cpet.item"] == "int8"
    assert val.data.tags["dvc.in.data/processed"] == "0123456789abcdef0123456789abcdef.dir"
    assert comp.data.tags["dvc.in.models/base"] == "fedcba9876543210fedcba9876543210.dir"
    assert comp.data.tags["upstream.validate"] == val.info.run_id
    assert "upstream.fetch" not in comp.data.tags  # fetch never ran here: no run to link
    assert "prefect.flow_run_id" not in val.data.tags  # not inside a flow


def test_failed_stage_is_a_failed_run_with_its_reports(project):
    from mlflow import MlflowClient

    from cpet.errors import DataError

    root, params = project
    path = root / "data/processed/tiny/test.jsonl"
    path.write_text(path.read_text().replace('"label": "neg"', '"label": "other"', 1))
    with pytest.raises(DataError):
        STAGES["validate"](params, root)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cpet").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("DataError: validation failed: tiny/test: expect_column_values_to_be_in_set")
    assert "reports/validate.json" in {a.path for a in client.list_artifacts(run.info.run_id, "reports")}


def test_unreachable_tracking_server_is_one_error_line(tiny_project, monkeypatch, capsys):
    import socket

    from cpet.cli import main

    root, params = tiny_project
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = params.model_dump(by_alias=True, mode="json")
    raw["track"]["enabled"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["--root", str(root), "--params", str(root / "params.yaml"), "validate"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: tracking: cannot reach the MLflow server at http://127.0.0.1:{port}")


def test_learning_curves_are_step_metrics_report_files_and_dvc_plots(project):
    """Issue 13: every trainer run keeps its per-step history (loss terms, lr, validation
    accuracy) as a report file (a DVC plot) and as MLflow step metrics."""
    import json
    import subprocess
    import sys

    from mlflow import MlflowClient

    root, params = project
    STAGES["compress"](params, root, method="int8")
    STAGES["teacher"](params, root)
    STAGES["inherit"](params, root, method="int8")
    STAGES["recover"](params, root, method="int8")
    steps = params.recover.train.steps
    curve = json.loads((root / "reports/curves/recover/int8/tiny/compressed+cpet.json").read_text())
    assert [e["step"] for e in curve] == list(range(1, steps + 1))
    assert {"lr", "loss", "task", "mse", "kl"} <= set(curve[0])
    assert [e["step"] for e in curve if e["validation"] is not None] == list(range(3, steps + 1, 3))
    assert "mse" not in json.loads((root / "reports/curves/recover/int8/tiny/compressed+pet.json").read_text())[0]
    teacher = json.loads((root / "reports/curves/teacher/tiny.json").read_text())
    assert len(teacher) == params.teacher.train.steps

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpet")
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "recover[int8]")
    kl = client.get_metric_history(run.info.run_id, "curve/recover/int8/tiny/compressed_cpet/kl")
    assert [m.step for m in kl] == list(range(1, steps + 1))
    assert [m.value for m in kl] == [e["kl"] for e in curve]

    # dvc plots show renders them from dvc.yaml's stage plots
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    shown = json.loads(out)["data"]
    assert any("curves/recover/int8/tiny/compressed+cpet.json" in k for k in shown)
    assert any("curves/teacher/tiny.json" in k for k in shown)
    assert shown["reports/curves/teacher/tiny.json"][0]["type"] == "vega"
