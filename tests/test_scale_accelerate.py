"""`accelerate launch` with the repo's CPU config runs the trainer as 2 DDP processes (gloo)."""

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
