"""LoRA settings, target discovery and adapter save/load through peft."""

import pytest
import torch
from pydantic import ValidationError

import tinypet as tiny
from cpet.errors import ConfigError
from cpet.pet.lora import lora_config
from cpet.pet import attach_lora, attention_targets, linear_targets, load_adapter, save_adapter
from libsettings import lora_settings


def test_default_targets_are_attention_projections():
    m = tiny.model()
    assert attention_targets(m) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    cfg = lora_config(lora_settings(rank=4), m)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.task_type == "CAUSAL_LM" and cfg.r == 4
    assert "lm_head" not in " ".join(linear_targets(m)) and len(linear_targets(m)) == 14


def test_settings_reject_unknown_keys_and_explicit_targets_win():
    with pytest.raises(ValidationError):
        lora_settings(rank=4, rnak=3)
    assert set(lora_config(lora_settings(target_modules=["down_proj"])).target_modules) == {"down_proj"}


def test_save_and_load_round_trip(tmp_path, batch):
    pm = attach_lora(tiny.model(), lora_settings(rank=4, dropout=0.0))
    tiny.randomize_adapters(pm)
    pm.eval()
    ref = pm(**batch).logits
    save_adapter(pm, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    loaded = load_adapter(tiny.model(), tmp_path / "a")
    torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert any(p.requires_grad for p in load_adapter(tiny.model(), tmp_path / "a", trainable=True).parameters())


def test_load_adapter_names_a_bad_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a peft adapter directory"):
        load_adapter(tiny.model(), tmp_path)
