"""Structured pruning: zero-importance units go without changing outputs; shapes, config, kept maps."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from cpet.compress import compress, load_compressed, parse_config, save_compressed
from cpet.pet import slice_lora_state
from cpet.errors import CpetError

HD = 16  # head_dim of the tiny model: 64 hidden / 4 heads


def _with_dead_units(make_model, kind="llama"):
    """A model whose KV group 1 (query heads 2, 3) and 32 FFN neurons per layer contribute nothing."""
    model = make_model(kind, seed=3)
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight[:, 2 * HD : 4 * HD] = 0
            neurons = torch.randperm(128, generator=torch.Generator().manual_seed(i))[:32]
            layer.mlp.down_proj.weight[:, neurons] = 0
            dead[i] = set(neurons.tolist())
    return model, dead


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_removing_zero_importance_units_keeps_outputs(make_model, calib, inputs, run, importance, kind):
    model, dead = _with_dead_units(make_model, kind)
    cfg = parse_config("s", {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.25, "importance": importance})
    cm = compress(model, cfg, calib)
    torch.testing.assert_close(run(cm.model, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    c = cm.model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, HD, 96)
    attn = cm.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * HD, 64) and attn.k_proj.weight.shape == (HD, 64)
    assert attn.o_proj.weight.shape == (64, 2 * HD) and cm.model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    kept = cm.info["kept"]
    assert kept["model.layers.0.self_attn.q_proj"] == {"out": list(range(2 * HD))}
    assert kept["model.layers.0.self_attn.k_proj"] == {"out": list(range(HD))}
    assert kept["model.layers.1.self_attn.o_proj"] == {"in": list(range(2 * HD))}
    for i in range(2):
        neurons = kept[f"model.layers.{i}.mlp.down_proj"]["in"]
        assert kept[f"model.layers.{i}.mlp.up_proj"]["out"] == neurons == kept[f"model.layers.{i}.mlp.gate_proj"]["out"]
        assert set(neurons) == set(range(128)) - dead[i]
    assert cm.records == {}  # nothing packed: a plain, smaller float model
    if kind == "llama":  # tied embeddings stay tied
        assert cm.model.lm_head.weight is cm.model.model.embed_tokens.weight
    assert sum(p.numel() for p in cm.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_activation_importance_beats_magnitude_here(make_model, calib, inputs, run):
    model = make_model("llama", seed=5)
    ref = run(model, inputs)
    errs = {}
    for imp in ("activation", "magnitude"):
        cm = compress(model, {"method": "structured", "ffn_ratio": 0.5, "importance": imp}, calib)
        errs[imp] = (run(cm.model, inputs) - ref).pow(2).mean().item()
    assert errs["activation"] <= errs["magnitude"] * 1.5  # random tiny model: only a sanity bound


def test_pruned_dir_loads_with_vanilla_transformers(make_model, calib, inputs, run, tmp_path):
    model, _ = _with_dead_units(make_model)
    cm = compress(model, {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.25}, calib)
    man = save_compressed(cm, tmp_path / "s")
    assert man["weights_file"] == "model.safetensors" and man["kept"] == cm.info["kept"]
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(run(vanilla, inputs), run(cm.model, inputs), rtol=0, atol=0)
    loaded = load_compressed(tmp_path / "s")
    assert torch.equal(run(loaded, inputs), run(cm.model, inputs))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_adapter_trained_on_original_slices_to_pruned_model(make_model, calib, inputs, run):
    model, _ = _with_dead_units(make_model)
    cm = compress(model, {"method": "structured", "heads_ratio": 0.5}, calib)  # FFN untouched
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    teacher = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():  # the teacher adapter, like the base, ignores the dead heads' outputs
        for layer in model.model.layers:
            layer.self_attn.o_proj.lora_A["default"].weight[:, 2 * HD : 4 * HD] = 0
    student = get_peft_model(cm.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    res = set_peft_model_state_dict(student, slice_lora_state(get_peft_model_state_dict(teacher), cm.info["kept"]))
    assert not res.unexpected_keys
    torch.testing.assert_close(run(student, inputs), run(teacher, inputs), rtol=1e-5, atol=1e-5)
    a = student.base_model.model.model.layers[0].self_attn
    assert a.o_proj.lora_A["default"].weight.shape == (4, 2 * HD) and a.q_proj.lora_B["default"].weight.shape == (
        2 * HD,
        4,
    )


def test_compress_refuses_a_model_with_adapters(make_model):
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CpetError, match="compress the base model before adding adapters"):
        compress(peft_model, {"method": "int8"})
