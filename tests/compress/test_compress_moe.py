"""MoEfication: k = E is the dense FFN; only selected experts run; skipped compute is measured."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from cpet.compress import MoEFFN, compress, moe_stats, parse_config, summarize


@pytest.mark.parametrize("kind", ["llama", "neox"])  # gated SiLU MLP; plain GELU MLP with biases
@pytest.mark.parametrize("router", ["centroid", "fitted"])
def test_top_k_equal_to_num_experts_is_the_dense_ffn(make_model, calib, inputs, run, kind, router):
    model = make_model(kind)
    cm = compress(model, parse_config("e", {"method": "moe", "num_experts": 4, "top_k": 4, "router": router}), calib)
    moes = [m for m in cm.model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == 2
    torch.testing.assert_close(run(cm.model, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, 64)
    dense = model.gpt_neox.layers[0].mlp if kind == "neox" else model.model.layers[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(moes[0](x), dense(x), rtol=1e-5, atol=1e-5)


def test_experts_partition_the_neurons(llama, calib):
    cm = compress(llama, {"method": "moe", "num_experts": 8, "top_k": 2}, calib)
    moe = cm.model.model.layers[0].mlp
    assert isinstance(moe, MoEFFN)
    idx = moe.neuron_index
    assert idx.shape == (8, 16) and sorted(idx.reshape(-1).tolist()) == list(range(128))
    expert = moe.experts[3]
    assert isinstance(expert.up_proj, torch.nn.Linear) and expert.down_proj.weight.shape == (64, 16)
    src = llama.model.layers[0].mlp
    assert torch.equal(expert.gate_proj.weight, src.gate_proj.weight[idx[3]])
    assert torch.equal(expert.down_proj.weight, src.down_proj.weight[:, idx[3]])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_only_selected_experts_run_and_skip_is_measured(llama, calib, inputs, run, k):
    cm = compress(llama, {"method": "moe", "num_experts": 4, "top_k": k}, calib)
    assert cm.info["moe"]["measured_on_calibration"]["skipped_ffn_fraction"] == pytest.approx(1 - k / 4)
    moe = cm.model.model.layers[1].mlp
    calls = []
    for e in moe.experts:
        e.up_proj.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    run(cm.model, inputs)
    assert sum(calls) == inputs.numel() * k  # every token computed exactly k experts
    assert moe_stats(cm.model)["skipped_ffn_fraction"] == pytest.approx(1 - k / 4)
    assert summarize(cm)["skipped_ffn_fraction"] == pytest.approx(1 - k / 4)


def test_fitted_router_tracks_expert_outputs_better_than_centroid(llama, calib):
    dense = llama.model.layers[1].mlp
    seen = []
    handle = dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in calib:
            llama(**b)
    handle.remove()
    h = torch.cat(seen)  # the FFN's real inputs on the calibration tokens
    errs = {}
    for router in ("fitted", "centroid"):
        cm = compress(llama, {"method": "moe", "num_experts": 8, "top_k": 2, "router": router}, calib)
        with torch.no_grad():
            errs[router] = ((cm.model.model.layers[1].mlp(h) - dense(h)).norm() / dense(h).norm()).item()
    assert errs["fitted"] < errs["centroid"]


def test_lora_on_attention_of_moe_model_trains(llama, calib, inputs):
    cm = compress(llama, {"method": "moe", "num_experts": 4, "top_k": 2}, calib)
    model = get_peft_model(cm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    wrapped = [n for n, m in model.named_modules() if n.endswith("experts.0.up_proj")]
    assert wrapped and hasattr(model.get_submodule(wrapped[0]), "lora_A")  # expert Linears are peft-wrappable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "router" in n)  # router frozen
