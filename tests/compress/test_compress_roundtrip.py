"""Artifacts: save/load is exact in both forms, the manifest says what it should, writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from cpet.compress import compress, load_compressed, load_compressed_model, parse_config, read_manifest, save_compressed
from cpet.io import sha256_file

CONFIGS = {
    "int8": {"method": "int8"},
    "int8_emb": {"method": "int8", "embeddings": True},
    "int4_gptq": {"method": "int4", "group_size": 16},
    "int3_rtn": {"method": "int3", "group_size": 32, "algorithm": "rtn"},
    "magnitude": {"method": "unstructured", "sparsity": 0.5},
    "wanda": {"method": "unstructured", "sparsity": 0.6, "score": "wanda"},
    "two_four": {"method": "2:4"},
    "structured": {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.5},
    "moe": {"method": "moe", "num_experts": 4, "top_k": 2},
    "struct_int8": {"method": "mixed", "steps": [{"method": "structured", "ffn_ratio": 0.25}, {"method": "int8"}]},
    "moe_24_int4": {
        "method": "mixed",
        "steps": [
            {"method": "moe", "num_experts": 4, "top_k": 1},
            {"method": "2:4"},
            {"method": "int4", "group_size": 16},
        ],
    },  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_is_exact_in_both_forms(llama, calib, inputs, run, tmp_path, name):
    cm = compress(llama, parse_config(name, CONFIGS[name]), calib)
    out = tmp_path / name
    man = save_compressed(cm, out, source_hash="f" * 64)
    train = run(cm.model, inputs)

    loaded = load_compressed_model(out)
    loaded.verify()
    assert torch.equal(run(loaded.model, inputs), train)
    state, back = cm.model.state_dict(), loaded.model.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    for n, rec in cm.records.items():
        other = loaded.records[n]
        assert (rec.mask is None) == (other.mask is None) and (rec.mask is None or torch.equal(rec.mask, other.mask))
        if rec.quant is not None:
            assert torch.equal(rec.quant.levels, other.quant.levels) and torch.equal(
                rec.quant.scales, other.quant.scales
            )

    deploy = load_compressed(out, form="deploy")
    torch.testing.assert_close(run(deploy, inputs), train, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cm.deploy_model(), inputs), train, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in load_compressed(out).parameters())

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == man == read_manifest(out)
    assert man["method"] == CONFIGS[name]["method"] and man["params"]["method"] == CONFIGS[name]["method"]
    assert man["name"] == f"compress.methods.{name}" and man["source"]["sha256"] == "f" * 64
    assert man["bytes_on_disk"] == sum(p.stat().st_size for p in out.iterdir() if p.name != "manifest.json")
    assert man["parameters"] == sum(p.numel() for p in {id(p): p for p in cm.model.parameters()}.values())
    assert man["parameters"] == sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    methods = [s["method"] for s in CONFIGS[name].get("steps", [CONFIGS[name]])]
    if not {"structured", "moe"} & set(methods):
        assert man["parameters"] == man["source_parameters"]
    assert set(man["weights"]) == set(cm.records)
    assert (man["kept"] is not None) == ("structured" in methods)
    assert (man["moe"] is not None) == ("moe" in methods)
    assert [s["method"] for s in man["steps"]] == methods
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary leftovers


def test_size_and_sparsity_in_manifest(llama, tmp_path):
    base = save_compressed(compress(llama, {"method": "unstructured", "sparsity": 0.01}), tmp_path / "a")
    int8 = save_compressed(compress(llama, {"method": "int8", "embeddings": True}), tmp_path / "b")
    sparse = save_compressed(compress(llama, {"method": "unstructured", "sparsity": 0.5}), tmp_path / "c")
    assert int8["bytes_on_disk"] < 0.3 * base["bytes_on_disk"] and int8["bits"] == [8]
    assert sparse["sparsity"] == 0.5 and sparse["bytes_on_disk"] < 0.8 * base["bytes_on_disk"]
    assert int8["source_bytes"] == sum(p.numel() * 4 for p in llama.parameters())


def test_overwrite_and_source_hash(llama, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"model")
    out = tmp_path / "o"
    save_compressed(compress(llama, {"method": "2:4"}), out)
    man = save_compressed(compress(llama, {"method": "int8"}), out, source_hash=sha256_file(src))
    assert read_manifest(out)["method"] == "int8" == man["method"]
    assert man["source"]["sha256"] == sha256_file(src)
    assert not (out / "model.safetensors").exists() and (out / "compressed.safetensors").exists()


def test_bfloat16_model_roundtrip(make_model, inputs, run, tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    cm = compress(model, {"method": "mixed", "steps": [{"method": "2:4"}, {"method": "int4", "group_size": 16}]})
    cm.verify()
    save_compressed(cm, tmp_path / "b")
    loaded = load_compressed(tmp_path / "b")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.equal(run(loaded, inputs), run(cm.model, inputs))
    torch.testing.assert_close(run(load_compressed(tmp_path / "b", form="deploy"), inputs), run(cm.model, inputs))
