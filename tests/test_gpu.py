"""The CUDA path, checked where a GPU exists (skipped on CPU machines and in CI).

Stages put models on ``cpet.env.device()``; these tests run the tiny pipeline there and compare
it with the CPU run, compress on the GPU, and train under bf16 autocast on the GPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rows(root):
    return {(r["compression"], r["variant"]): r["accuracy"]
            for r in json.loads((root / "reports/results.json").read_text())}


def test_pipeline_on_gpu_matches_cpu(tiny_project, tmp_path_factory, monkeypatch):
    from cpet.stages import STAGES
    from cpet.stages.common import load_base, load_compressed_base

    root, params = tiny_project
    cpu_root = tmp_path_factory.mktemp("cpu") / "project"
    shutil.copytree(root, cpu_root)
    stages = ("compress", "teacher", "inherit", "recover", "evaluate")

    monkeypatch.setenv("CPET_DEVICE", "cuda")
    assert load_base(root)[0].device.type == "cuda"
    for name in stages:
        STAGES[name](params, root)
    assert next(load_compressed_base(root, "int8")[0].parameters()).device.type == "cuda"
    teacher = json.loads((root / "reports/teacher/tiny.json").read_text())
    assert teacher["train"]["steps"] == 6

    monkeypatch.setenv("CPET_DEVICE", "cpu")
    for name in stages:
        STAGES[name](params.model_copy(update={"fetch": params.fetch.model_copy(
            update={"cache_dir": str(cpu_root / ".cache")})}), cpu_root)
    gpu, cpu = _rows(root), _rows(cpu_root)
    assert gpu.keys() == cpu.keys()
    # same data, seeds and recipe: float summation order differs, so allow a couple of flips of 32
    assert all(abs(gpu[k] - cpu[k]) <= 0.1 for k in gpu), (gpu, cpu)


@pytest.mark.parametrize("config", [
    {"method": "int8"}, {"method": "int4", "group_size": 16}, {"method": "int3", "group_size": 32},
    {"method": "unstructured", "sparsity": 0.5, "score": "wanda"}, {"method": "2:4"},
    {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.5}, {"method": "moe", "num_experts": 4, "top_k": 2},
])
def test_compress_on_gpu_saves_and_deploys(tmp_path, config):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpet.compress import compress, load_compressed_model, parse_config, save_compressed

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64)).eval().cuda()
    calib = [{"input_ids": torch.randint(0, 128, (4, 16))} for _ in range(2)]
    cm = compress(model, parse_config("m", config), calib)
    cm.verify()
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    with torch.no_grad():
        train = cm.model(input_ids=ids).logits
        deploy = cm.deploy_model()(input_ids=ids).logits
    torch.testing.assert_close(deploy, train, rtol=1e-4, atol=1e-4)
    save_compressed(cm, tmp_path / "m", source_hash="f" * 64)
    loaded = load_compressed_model(tmp_path / "m").model.cuda()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, train, rtol=1e-5, atol=1e-5)
