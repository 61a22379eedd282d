"""Stages track to, register in and predict from a real `mlflow server` over HTTP (loopback)."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cpet.stages import STAGES
from test_registry import _cli, _params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """`make mlflow-server`'s command on a free port: sqlite runs + registry, served artifacts."""
    store = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (store / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield uri, store
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_track_register_and_predict_over_http(mlflow_server, tiny_project, monkeypatch, capsys):
    from mlflow import MlflowClient

    uri, store = mlflow_server
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the URI comes from params.track;
        monkeypatch.setenv(var, "unset")  # set then deleted, so whatever `cpet` sets is undone
        monkeypatch.delenv(var)
    root, params = tiny_project
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")  # which reports each stage run logs
    params, raw = _params(params, {"min_accuracy": 0.0, "min_recovery_ratio": None}, tracking_uri=uri)
    for name in ("validate", "compress", "teacher", "inherit", "recover", "evaluate", "register"):
        STAGES[name](params, root)
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()  # all on the server

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cpet").experiment_id])}
    assert {"validate", "register"} <= set(runs) and runs["validate"].info.status == "FINISHED"
    assert runs["validate"].data.metrics["success"] == 1.0
    # artifacts went through the server (mlflow-artifacts:/) into its --artifacts-destination
    assert client.get_experiment_by_name("cpet").artifact_location.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(runs["validate"].info.run_id, "reports")}
    assert "reports/validate.json" in listed
    assert any(p.name == "validate.json" for p in (store / "artifacts").rglob("*"))
    assert str(client.get_model_version_by_alias("cpet-tiny-int8", "champion").version) == "1"

    # the champion loads from the server: `cpet predict` by alias, one JSON line per text
    capsys.readouterr()
    texts = ["good great fine", "bad awful poor"]
    assert _cli(root, raw, "predict", "--model", "models:/cpet-tiny-int8@champion", *texts) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == texts and all(x["label"] in ("neg", "pos") for x in lines)
