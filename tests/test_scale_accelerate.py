"""`accelerate launch` with the repo's CPU config runs the trainer as 2 DDP processes (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_configs_parse_as_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    for name, kind in (("cpu-2proc", "MULTI_GPU"), ("multi-gpu", "MULTI_GPU")):
        path = ROOT / "configs/accelerate" / f"{name}.yaml"
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == 2
        assert yaml.safe_load(path.read_text())["mixed_precision"] in ("no", "bf16")  # a string, not False


def test_accelerate_launch_two_cpu_processes_train_in_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", str(port),
                           str(ROOT / "tests/pet/ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["world"] == "2" and meta["distributed_type"].endswith("MULTI_CPU") and meta["steps"] == "4"
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # DDP kept the ranks in step
    assert any("rec_B" in k and a[k].abs().sum() > 0 for k in a)  # it trained


def test_discard_writes_drops_every_io_write(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpet import io
    with io.discard_writes():
        io.write_json(tmp_path / "a.json", {"x": 1})
        with io.atomic_dir(tmp_path / "d") as scratch:
            (scratch / "f").write_text("x")
            assert scratch.parent != tmp_path
        io.save_figure(plt.figure(), tmp_path / "p.png")
    assert not scratch.exists() and list(tmp_path.iterdir()) == []
    io.write_json(tmp_path / "a.json", {"x": 1})  # outside the block, writes happen again
    assert (tmp_path / "a.json").is_file()


def test_recover_stage_under_accelerate_launch_rank0_writes(tiny_project, tmp_path, monkeypatch):
    """`accelerate launch -m cpet.cli recover` on 2 CPU processes: both ranks train in step (DDP),
    rank 0 alone writes the bundles and the report and opens the one MLflow run."""
    import mlflow

    from cpet.config import parse_params
    from cpet.stages import STAGES

    root, params = tiny_project
    raw = params.model_dump(by_alias=True, mode="json")
    raw["compress"]["methods"] = {"int8": {"method": "int8"}}
    raw["recover"]["variants"] = ["compressed+cpet"]
    for name in ("compress", "teacher", "inherit"):
        STAGES[name](parse_params(raw), root)
    raw["track"] = {"enabled": True, "tracking_uri": "sqlite:///mlflow.db", "experiment": "cpet"}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "CPET_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", str(port),
                           "-m", "cpet.cli", "--params", str(root / "params.yaml"), "--root", str(root),
                           "recover", "--method", "int8"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = root / "models/recover/int8/tiny/compressed+cpet"
    state = load_file(str(bundle / "recovery.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in state.items() if "rec_B" in k or "up" in k)  # it trained
    report = json.loads((root / "reports/recover/int8.json").read_text())
    assert report["tiny"]["compressed+cpet"]["steps"] == raw["recover"]["train"]["steps"]
    assert [p.name for p in (root / "models/recover").iterdir()] == ["int8"]  # no temporary siblings
    assert list(scratch.glob("cpet-discard-*")) == []  # rank 1's scratch folders are gone
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cpet"], output_format="list")
    assert [r.info.run_name for r in runs] == ["recover[int8]"]  # one run, from rank 0
