"""w8a8: SmoothQuant keeps the function, per-token int8 activations in training form, the guard,
save/load, the PyTorch deployment form, the ONNX MatMulInteger graph, and what training sees."""

from __future__ import annotations

import copy

import pytest
import torch

from cpet.compress import compress, load_compressed_model, parse_config, save_compressed
from cpet.compress.arch import linear_layers
from cpet.compress.w8a8 import act_quantized, fake_quant, quantize_tokens, smooth
from cpet.errors import ConfigError


def outliers(model: torch.nn.Module, scale: float = 40.0) -> torch.nn.Module:
    """A few large channels in every norm's output: the activation outliers SmoothQuant is for."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = scale
            layer.post_attention_layernorm.weight[3] = scale
    return model


def layer_input(model: torch.nn.Module, name: str, ids: torch.Tensor, run) -> torch.Tensor:
    """What module ``name`` multiplies (its input after any pre-hook) on one forward pass of ``ids``."""
    seen = {}

    def grab(_module, args, _out) -> None:
        seen.setdefault("x", args[0])

    hook = model.get_submodule(name).register_forward_hook(grab)
    run(model, ids)
    hook.remove()
    return seen["x"]


@pytest.fixture(scope="module")
def peaky(make_model):
    return outliers(make_model("llama"))


def test_quantize_tokens_is_symmetric_int8_per_row():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [300.0, 1.0, -3.0]])
    q, s = quantize_tokens(x)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    torch.testing.assert_close(s[:, 0], torch.tensor([2.0 / 127, 1e-8 / 127, 300.0 / 127]))
    assert torch.equal(q[1], torch.zeros(3))  # an all-zero row stays zero
    assert torch.all((q * s - x).abs() <= s / 2 * (1 + 1e-6))  # half a step per row at most


def test_fake_quant_has_a_straight_through_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    y = fake_quant(x)
    q, s = quantize_tokens(x.detach())
    assert torch.equal(y.detach(), q * s)  # forward: exactly the kernel's values
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(3, 8))  # backward: identity


def test_smoothing_alone_keeps_the_function(peaky, calib, inputs, run):
    model = copy.deepcopy(peaky)
    info = smooth(model, calib, linear_layers(model), alpha=0.5)
    # 2 layers x (input norm -> q/k/v, post-attention norm -> gate/up, up -> down)
    assert info["smoothed_groups"] == 6 and not info["not_smoothable"]
    assert info["max_outlier_ratio_before"] > 10
    before, after = run(peaky, inputs), run(model, inputs)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    norm = model.model.layers[0].input_layernorm.weight
    assert float(norm[5].detach()) < 40.0 / 2  # the outlier channel moved into the weights


def test_smoothing_makes_int8_activations_more_accurate(peaky, calib, inputs, run):
    ref = run(peaky, inputs)
    err = {}
    for alpha in (0.0, 0.5):
        cm = compress(peaky, {"method": "w8a8", "alpha": alpha}, calib)
        err[alpha] = float((run(cm.model, inputs) - ref).abs().mean())
    assert err[0.5] < 0.7 * err[0.0]


def test_training_form_quantizes_activations_per_token(peaky, calib, inputs, run):
    cm = compress(peaky, {"method": "w8a8"}, calib)
    step = cm.info["steps"][0]
    assert step["activations"] == "per-token" and step["int8_activations"] == step["quantized"] == 14
    assert all(rec.act == "per-token" and rec.quant.bits == 8 for rec in cm.records.values())
    assert all(act_quantized(cm.model.get_submodule(n)) for n in cm.records)
    cm.verify()
    # the int8 input is what the layer multiplies: same weights, float activations differ
    name = "model.layers.0.mlp.down_proj"
    seen = {"x": layer_input(cm.model, name, inputs, run)}
    q, s = quantize_tokens(seen["x"])
    torch.testing.assert_close(seen["x"], q * s, atol=0, rtol=0)


@pytest.mark.parametrize("activations", ["per-token", "static"])
def test_prediction_does_not_depend_on_the_batch(peaky, calib, inputs, activations):
    """Per-token or static scales: a row's logits are the same alone and beside another (padded) row."""
    cm = compress(peaky, {"method": "w8a8", "activations": activations}, calib)
    ids = inputs[:, :8]
    with torch.no_grad():
        alone = cm.model(input_ids=ids[:1], attention_mask=torch.ones(1, 8, dtype=torch.long)).logits
        other = ids[1:] * 0 + 100  # a very different row, half padding
        mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
        both = cm.model(input_ids=torch.cat([ids[:1], other]), attention_mask=mask).logits
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


def test_guard_keeps_outlier_layers_float(make_model, calib):
    """A channel 5,000x larger in the input while the readers' weights shrink it back: the function
    is the plain model's, but per-token int8 rounds every other channel of q/k/v's input to 0."""
    model = make_model("llama")
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        model.model.layers[1].input_layernorm.weight[5] *= 5000.0
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[:, 5] /= 5000.0
    strict = compress(model, {"method": "w8a8", "alpha": 0.0, "guard": 0.02}, calib)
    step = strict.info["steps"][0]
    kept = set(step["float_activations"])
    assert kept == {f"model.layers.1.self_attn.{p}_proj" for p in "qkv"}
    assert step["int8_activations"] == 14 - 3
    for name, rec in strict.records.items():
        assert (rec.act is None) == (name in kept) and rec.quant.bits == 8  # weights int8 either way
        assert act_quantized(strict.model.get_submodule(name)) == (name not in kept)
    loose = compress(model, {"method": "w8a8", "alpha": 0.0, "guard": 10.0}, calib)
    assert loose.info["steps"][0]["float_activations"] == []


@pytest.mark.parametrize("activations", ["per-token", "static"])
def test_save_load_deploy_roundtrip(peaky, calib, inputs, run, tmp_path, activations):
    cm = compress(peaky, {"method": "w8a8", "activations": activations}, calib)
    save_compressed(cm, tmp_path / "c")
    back = load_compressed_model(tmp_path / "c")
    acts = {n: (r.act, r.act_scale) for n, r in cm.records.items()}
    assert {n: (r.act, r.act_scale) for n, r in back.records.items()} == acts
    assert all((s is None) == (activations == "per-token") for _, s in acts.values())
    assert torch.equal(run(back.model, inputs), run(cm.model, inputs))
    deployed = back.deploy_model()  # packed int8 weights, the same per-token activations
    torch.testing.assert_close(run(deployed, inputs), run(cm.model, inputs), atol=1e-5, rtol=1e-5)


def test_mixed_structured_then_w8a8(peaky, calib, inputs, run):
    cfg = {"method": "mixed", "steps": [{"method": "structured", "ffn_ratio": 0.25}, {"method": "w8a8"}]}
    cm = compress(peaky, cfg, calib)
    assert [s["method"] for s in cm.info["steps"]] == ["structured", "w8a8"]
    assert cm.model.model.layers[0].mlp.down_proj.in_features == 96
    assert run(cm.model, inputs).isfinite().all()


def test_w8a8_needs_calibration_and_checks_its_config(peaky):
    with pytest.raises(ConfigError, match="compress.methods.w.method: 'w8a8' needs calibration"):
        compress(peaky, parse_config("w", {"method": "w8a8"}))
    with pytest.raises(ConfigError, match="compress.methods.w.alpha"):
        parse_config("w", {"method": "w8a8", "alpha": 1.5})
    with pytest.raises(ConfigError, match="cannot follow 'w8a8'"):
        parse_config("m", {"method": "mixed", "steps": [{"method": "w8a8"}, {"method": "int8"}]})


def test_adapters_train_through_int8_activations(peaky, calib, inputs):
    """LoRA on a w8a8 base: side paths read the float input, gradients reach every LoRA factor."""
    from cpet.pet import attach_lora
    from libsettings import lora_settings

    cm = compress(peaky, {"method": "w8a8"}, calib)
    model = attach_lora(copy.deepcopy(cm.model), lora_settings(rank=4, alpha=8.0, dropout=0.0))
    model.train()
    out = model(input_ids=inputs, labels=inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    base = model.get_base_model().model.layers[0].self_attn.q_proj
    assert act_quantized(base.base_layer) and not act_quantized(base)  # the hook is on the base layer only


def test_smoothing_leaves_producers_read_by_an_excluded_layer(peaky, calib, inputs, run):
    """q_proj excluded (stays float): its norm is not scaled (q_proj would see a changed input);
    k/v share that norm, so that group is skipped whole; the function is unchanged either way."""
    model = copy.deepcopy(peaky)
    targets = {n: m for n, m in linear_layers(model).items() if not n.endswith("layers.0.self_attn.q_proj")}
    info = smooth(model, calib, targets, alpha=0.5)
    assert info["not_smoothable"] == ["model.layers.0.input_layernorm"] and info["smoothed_groups"] == 5
    torch.testing.assert_close(run(model, inputs), run(peaky, inputs), atol=1e-4, rtol=1e-4)
    cm = compress(peaky, {"method": "w8a8", "exclude": ["*.layers.0.self_attn.q_proj"]}, calib)
    assert "model.layers.0.self_attn.q_proj" not in cm.records and len(cm.records) == 13


def test_static_scales_are_calibrated_absmax_and_saturate(peaky, calib, run, inputs):
    """static: each layer has its own calibrated scale; the training form multiplies values on that
    grid, saturated at -128..127 and rounded half to even like QuantizeLinear."""
    from cpet.compress.w8a8 import quantize_static

    cm = compress(peaky, {"method": "w8a8", "activations": "static"}, calib)
    assert cm.info["steps"][0]["activations"] == "static"
    name = "model.layers.1.mlp.down_proj"
    seen = {"x": layer_input(cm.model, name, inputs, run)}
    s = cm.records[name].act_scale
    assert s > 0
    q = seen["x"] / s
    torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)  # the layer multiplies grid values
    assert float(q.abs().max()) <= 128
    x = torch.tensor([[1000.0, -1000.0, 0.26, 0.25]])
    assert quantize_static(x, 0.5).tolist() == [[127.0, -128.0, 1.0, 0.0]]  # saturate; half to even
