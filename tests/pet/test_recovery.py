"""Recovery modules as a peft tuner beside LoRA: init, gradients, bundle round trip, merge."""

import copy

import peft
import pytest
import torch

import tinypet as tiny
from cpet.errors import CpetError
from cpet.pet import (RecoveryConfig, attach_lora, attach_recovery, load_bundle,
                      merge_bundle, recovery_layers, save_bundle)
from cpet.pet.recovery import PEFT_TYPE, RecoveryLayer
from libsettings import lora_settings, recovery_settings


def _student(act="gelu", seed=0):
    m = attach_recovery(tiny.model(seed), recovery_settings(rank=4, act=act))
    return attach_lora(m, lora_settings(rank=4, dropout=0.0))


def test_registered_with_peft_and_zero_init_changes_nothing(batch):
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE].__name__ == "RecoveryModel"
    base = tiny.model()
    ref = base(**batch).logits
    m = peft.inject_adapter_in_model(RecoveryConfig(r=3, target_modules=["q_proj", "down_proj"]), copy.deepcopy(base),
                                     adapter_name="recover")
    assert len([x for x in m.modules() if isinstance(x, RecoveryLayer)]) == 4
    assert torch.equal(m(**batch).logits, ref)
    rec = attach_recovery(copy.deepcopy(base), recovery_settings(rank=4))
    assert len(recovery_layers(rec)) == 14  # every linear layer but the LM head
    assert torch.equal(rec(**batch).logits, ref)


def test_lora_wraps_recovery_and_gradients_reach_both(batch):
    pm = _student()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, RecoveryLayer) and isinstance(layer.get_base_layer(), torch.nn.Linear)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or ".rec_" in n) for n in trainable)
    assert any(".rec_A." in n for n in trainable) and any(".rec_B." in n for n in trainable)
    pm(**batch).logits.square().mean().backward()  # at init only B factors get gradients
    assert all(p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "rec_B" in n)
    pm.zero_grad()
    tiny.randomize_adapters(pm)
    pm(**batch).logits.square().mean().backward()
    for factor in ("lora_A", "lora_B", "rec_A", "rec_B"):
        grads = [p.grad for n, p in pm.named_parameters() if factor in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), factor


@pytest.mark.parametrize("act", ["gelu", "identity"])
def test_bundle_round_trip_is_identical(tmp_path, batch, act):
    pm = _student(act)
    tiny.randomize_adapters(pm)
    pm.eval()
    ref = pm(**batch).logits
    save_bundle(pm, tmp_path / "b")
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"adapter", "bundle.json", "recovery.safetensors"}
    again = load_bundle(tiny.model(), tmp_path / "b")
    assert torch.equal(again(**batch).logits, ref)
    assert not any(p.requires_grad for p in again.parameters())
    trainable = load_bundle(tiny.model(), tmp_path / "b", trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert any("rec_A" in n for n in names) and any("lora_B" in n for n in names)


def test_bundle_without_recovery(tmp_path, batch):
    pm = attach_lora(tiny.model(), lora_settings(rank=4, dropout=0.0))
    tiny.randomize_adapters(pm)
    save_bundle(pm, tmp_path / "b")
    assert torch.equal(load_bundle(tiny.model(), tmp_path / "b")(**batch).logits, pm.eval()(**batch).logits)


def test_identity_recovery_merges_and_gelu_refuses(batch):
    pm = _student("identity")
    tiny.randomize_adapters(pm)
    pm.eval()
    ref = pm(**batch).logits
    plain = merge_bundle(pm)
    assert not any(isinstance(m, (RecoveryLayer, peft.tuners.lora.LoraLayer)) for m in plain.modules())
    torch.testing.assert_close(plain(**batch).logits, ref, rtol=0, atol=1e-5)
    with pytest.raises(CpetError, match="not identity"):
        merge_bundle(_student("gelu"))


def test_settings_validate():
    with pytest.raises(Exception):
        recovery_settings(act="relu")
    with pytest.raises(ValueError):
        RecoveryConfig(act="relu", target_modules=["q_proj"])
