"""Genericity: the same methods on non-Llama causal LMs (found by type/shape, not module names)."""

from __future__ import annotations

import pytest
import torch

from cpet.compress import MoEFFN, compress, load_compressed, save_compressed

RAWS = [
    {"method": "int8"},
    {"method": "int4", "group_size": 16},  # GPTQ with calibration
    {"method": "unstructured", "sparsity": 0.5, "score": "wanda"},
    {"method": "2:4"},
    {"method": "moe", "num_experts": 4, "top_k": 2},
    {"method": "mixed", "steps": [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}]},
]


@pytest.mark.parametrize("kind", ["neox", "qwen2"])
@pytest.mark.parametrize("raw", RAWS, ids=lambda r: r["method"] + str(len(r)))
def test_methods_on_other_architectures(make_model, calib, inputs, run, tmp_path, kind, raw):
    model = make_model(kind)
    cm = compress(model, raw, calib)
    cm.verify()
    if raw["method"] == "moe":
        assert sum(isinstance(m, MoEFFN) for m in cm.model.modules()) == 2
    else:
        linears = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
        ]
        assert set(cm.records) == set(linears)  # every linear layer found, fused QKV included
    out = run(cm.model, inputs)
    assert torch.isfinite(out).all()
    save_compressed(cm, tmp_path / "o")
    assert torch.equal(run(load_compressed(tmp_path / "o"), inputs), out)
    torch.testing.assert_close(run(load_compressed(tmp_path / "o", form="deploy"), inputs), out, rtol=1e-5, atol=1e-5)
