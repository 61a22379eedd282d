"""Knowledge inheritance: teacher LoRA tensors copied by name and sliced like structured pruning."""

import copy

import pytest
import torch

import tinypet as tiny
from cpet.errors import CpetError
from cpet.pet import attach_lora, attach_recovery, inherit_adapter, save_adapter
from libsettings import lora_settings, recovery_settings

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _teacher(tmp_path, base):
    pm = attach_lora(copy.deepcopy(base), lora_settings(rank=4, dropout=0.0, target_modules=ALL))
    tiny.randomize_adapters(pm)
    save_adapter(pm, tmp_path / "teacher")
    return pm.eval()


def _kept_all(model):
    kept = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL:
            kept[name] = {"in": list(range(m.in_features))} if name.endswith(("o_proj", "down_proj")) \
                else {"out": list(range(m.out_features))}
    return kept


def test_pruning_that_removed_nothing_gives_the_teacher_exactly(tmp_path, batch):
    base = tiny.model()
    teacher = _teacher(tmp_path, base)
    student = inherit_adapter(tmp_path / "teacher", copy.deepcopy(base), _kept_all(base))
    assert torch.equal(student.eval()(**batch).logits, teacher(**batch).logits)
    assert all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)


def _shrink(base, kept):
    """A structurally pruned copy: KV group 1 (q heads 2,3) and 40 of 64 FFN neurons kept."""
    small = tiny.model(num_attention_heads=2, num_key_value_heads=1, intermediate_size=40)
    state = {}
    for key, w in base.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        for axis, idx in kept.get(mod, {}).items():
            w = w.index_select(0 if axis == "out" else 1, torch.tensor(idx))
        state[key] = w
    small.load_state_dict(state)
    return small


def _structured_kept():
    g = torch.Generator().manual_seed(3)
    ffn = sorted(torch.randperm(64, generator=g)[:40].tolist())
    q, kv = list(range(16, 32)), list(range(8, 16))
    kept = {}
    for i in range(2):
        p = f"model.layers.{i}."
        kept |= {p + "self_attn.q_proj": {"out": q}, p + "self_attn.k_proj": {"out": kv},
                 p + "self_attn.v_proj": {"out": kv}, p + "self_attn.o_proj": {"in": q},
                 p + "mlp.gate_proj": {"out": ffn}, p + "mlp.up_proj": {"out": ffn}, p + "mlp.down_proj": {"in": ffn}}
    return kept


def _delta(layer):
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]


def test_sliced_adapter_delta_is_the_teachers_delta_sliced(tmp_path):
    base = tiny.model()
    teacher = _teacher(tmp_path, base)
    kept = _structured_kept()
    student = inherit_adapter(tmp_path / "teacher", _shrink(base, kept), kept)
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    for name, spec in kept.items():
        full = "base_model.model." + name
        td, sd = _delta(t_mods[full]), _delta(s_mods[full])
        axis, idx = next(iter(spec.items()))
        expect = td[idx] if axis == "out" else td[:, idx]
        assert sd.shape == expect.shape == s_mods[full].get_base_layer().weight.shape
        torch.testing.assert_close(sd, expect, rtol=0, atol=1e-6)


def test_missing_kept_entry_is_an_error(tmp_path):
    base = tiny.model()
    _teacher(tmp_path, base)
    kept = _structured_kept()
    with pytest.raises(CpetError, match="after slicing"):
        inherit_adapter(tmp_path / "teacher", _shrink(base, kept), {k: v for k, v in kept.items() if "mlp" not in k})


def test_inherits_onto_a_model_with_recovery_modules(tmp_path, batch):
    base = tiny.model()
    teacher = _teacher(tmp_path, base)
    with_rec = attach_recovery(copy.deepcopy(base), recovery_settings(rank=2))
    student = inherit_adapter(tmp_path / "teacher", with_rec)
    assert torch.equal(student.eval()(**batch).logits, teacher(**batch).logits)  # B_rec = 0
