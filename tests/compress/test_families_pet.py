"""Adapters on Conv1D projections (GPT-2): inheritance through structured FFN pruning, merging."""

from __future__ import annotations

import copy

import torch
from families import build

from cpet.compress import compress
from cpet.pet import (
    attach_lora,
    attach_recovery,
    inherit_adapter,
    merge_bundle,
    save_adapter,
)
from cpet.pet.lora import lora_config
from libsettings import lora_settings, recovery_settings

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "rec_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_lora_on_conv1d_uses_fan_in_fan_out():
    settings = lora_settings(rank=4)
    assert lora_config(settings, build("gpt2")).fan_in_fan_out is True
    assert lora_config(settings, build("opt")).fan_in_fan_out is False


def test_inheritance_slices_conv1d_ffn_adapters(calib, tmp_path):
    teacher = build("gpt2")
    lora = attach_lora(copy.deepcopy(teacher), lora_settings(rank=4, dropout=0.0, target_modules=["c_fc", "c_proj"]))
    _randomize(lora)
    save_adapter(lora, tmp_path / "a")
    cm = compress(teacher, {"method": "structured", "ffn_ratio": 0.5}, calib)
    student = inherit_adapter(tmp_path / "a", cm.model, kept=cm.info["kept"])
    keep = cm.info["kept"]["transformer.h.0.mlp.c_fc"]["out"]
    assert len(keep) == 128  # GPT-2's FFN is 4 x 64 = 256 wide; half kept
    t_state, s_state = lora.state_dict(), student.state_dict()
    b = "base_model.model.transformer.h.0.mlp.{}.lora_{}.default.weight"
    assert torch.equal(s_state[b.format("c_fc", "B")], t_state[b.format("c_fc", "B")][keep])
    assert torch.equal(s_state[b.format("c_proj", "A")], t_state[b.format("c_proj", "A")][:, keep])
    assert torch.isfinite(_logits(student)).all()


def test_merge_bundle_folds_into_conv1d_weights():
    model = attach_lora(attach_recovery(build("gpt2"), recovery_settings(rank=4, act="identity")),
                        lora_settings(rank=4, dropout=0.0))
    _randomize(model)
    before = _logits(model.eval())
    plain = merge_bundle(model)
    torch.testing.assert_close(_logits(plain), before, atol=1e-5, rtol=1e-5)
