"""Crash safety: missing and damaged inputs are refused in one line; a SIGKILLed training stage
resumes to the same result as an uninterrupted run (issue 11)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cpet.errors import CpetError
from cpet.paths import require
from cpet.stages import STAGES

CPET = [sys.executable, "-m", "cpet.cli"]


def _write_params(root: Path, params, **train) -> Path:
    raw = params.model_dump(by_alias=True, mode="json")
    raw["track"]["enabled"] = False
    for section in ("teacher", "recover"):
        raw[section]["train"].update(train)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _cpet(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CPET, "--root", str(root), "--params", str(root / "params.yaml"), *args],
                          capture_output=True, text=True, env=env, timeout=600, **kw)


def test_a_stage_before_its_inputs_says_what_is_missing_and_who_makes_it(tmp_path, raw_params):
    """A fresh clone: `cpet recover` used to die in huggingface_hub with an HFValidationError."""
    from cpet.config import parse_params

    _write_params(tmp_path, parse_params(raw_params))
    proc = _cpet(tmp_path, "recover", "--method", "int3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == "error: models/base: missing; it is made by `dvc repro fetch` (or `cpet fetch`)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


@pytest.fixture
def trained_tiny(tiny_project):
    root, params = tiny_project
    STAGES["compress"](params, root, method="int8")
    STAGES["teacher"](params, root)
    _write_params(root, params)
    return root, params


@pytest.mark.parametrize(("artifact", "command", "output"), [
    ("models/compressed/int8/compressed.safetensors", ["inherit", "--method", "int8"], "models/inherit/int8"),
    ("models/teacher/tiny/adapter/adapter_model.safetensors", ["inherit", "--method", "int8"], "models/inherit/int8"),
    ("models/teacher/tiny/cache.safetensors", ["recover", "--method", "int8"], "models/recover/int8"),
    ("models/base/model.safetensors", ["teacher", "--task", "tiny"], "models/teacher/tiny"),
])
def test_a_truncated_artifact_is_refused_naming_it_and_nothing_is_written(trained_tiny, artifact, command, output):
    root, _ = trained_tiny
    before = (root / output).exists() and sorted(p.name for p in (root / output).rglob("*"))
    whole = _truncate(root / artifact)
    try:
        proc = _cpet(root, *command)
    finally:
        (root / artifact).write_bytes(whole)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {artifact}: damaged (") and "remake it with `dvc repro" in lines[0]
    after = (root / output).exists() and sorted(p.name for p in (root / output).rglob("*"))
    assert after == before  # the stage stopped before writing
    assert not [p for p in (root / output).parent.glob(".*tmp")]


def test_damaged_onnx_and_json_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    folder = tmp_path / "models/onnx/int3/tiny"
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph), folder / "model.onnx")
    (folder / "config.json").write_text('{"a": 1}')
    assert require(tmp_path, "models/onnx/int3") == tmp_path / "models/onnx/int3"
    _truncate(folder / "model.onnx")
    with pytest.raises(CpetError, match=r"models/onnx/int3/tiny/model.onnx: damaged \(not a valid ONNX model"):
        require(tmp_path, "models/onnx/int3")
    (folder / "model.onnx").unlink()
    (folder / "config.json").write_text('{"a": ')
    with pytest.raises(CpetError, match=r"tiny/config.json: damaged \(not valid JSON.*`dvc repro export@int3`"):
        require(tmp_path, "models/onnx/int3")


def _safetensors(folder: Path) -> dict:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*.safetensors"))}


def _kill_once_checkpointed(root: Path, command: list[str], ckpt_root: Path) -> None:
    """Start ``cpet <command>``, SIGKILL it as soon as a training checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CPET, "--root", str(root), "--params", str(root / "params.yaml"), *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not list(ckpt_root.glob("**/last/state.json")):
        assert proc.poll() is None, f"finished before a checkpoint was seen: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.parametrize(("stage", "command", "output"), [
    ("teacher", ["teacher", "--task", "tiny"], "models/teacher/tiny"),
    ("recover", ["recover", "--method", "int8"], "models/recover/int8"),
])
def test_sigkill_mid_training_then_rerun_equals_an_uninterrupted_run(tiny_project, tmp_path_factory, stage,
                                                                     command, output):
    import shutil

    root, params = tiny_project
    STAGES["compress"](params, root, method="int8")
    if stage == "recover":
        STAGES["teacher"](params, root)
        STAGES["inherit"](params, root, method="int8")
    clean = tmp_path_factory.mktemp("uninterrupted")
    for part in ("models", "data", "reports"):
        shutil.copytree(root / part, clean / part)
    long = {"steps": 300, "checkpoint_every": 30, "eval_every": 150}  # a few seconds: room to kill
    for r in (root, clean):
        _write_params(r, params, **long)
    cache = yaml.safe_load((root / "params.yaml").read_text())["fetch"]["cache_dir"]
    (clean / "params.yaml").write_text((clean / "params.yaml").read_text().replace(cache, str(clean / ".cache")))

    _kill_once_checkpointed(root, command, Path(cache) / "checkpoints" / stage)
    assert not (root / output).exists()  # killed before its atomic swap: no half-written output
    resumed = _cpet(root, *command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = _cpet(clean, *command)
    assert straight.returncode == 0, straight.stderr[-2000:]

    report = Path("reports") / stage / (f"{command[-1]}.json")
    first, second = (json.loads((r / report).read_text()) for r in (root, clean))
    runs = [first["train"]] if stage == "teacher" else [v for t in first.values() for v in t.values()]
    assert any(r["resumed_from"] > 0 for r in runs)
    strip = lambda m: json.loads(json.dumps(m).replace('"resumed_from"', '"_"'))  # noqa: E731
    drop = ("examples_per_s", "_", "cache_seconds")

    def comparable(m):
        if isinstance(m, dict):
            return {k: comparable(v) for k, v in m.items() if k not in drop}
        return m
    assert comparable(strip(first)) == comparable(strip(second))
    assert _safetensors(root / output) == _safetensors(clean / output)
