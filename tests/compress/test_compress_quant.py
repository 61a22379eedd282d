"""Quantization: packing, the error bound its scale implies, GPTQ, sizes, deploy == train."""

from __future__ import annotations

import pytest
import torch

from cpet.compress import QuantEmbedding, QuantLinear, compress, parse_config, qmath, summarize
from cpet.compress.gptq import gptq
from cpet.compress.serialization import deploy_tensors


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [8, 13, 64])
def test_pack_unpack_roundtrip(bits, cols):
    levels = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    packed = qmath.pack(levels, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols * bits // 8))
    assert torch.equal(qmath.unpack(packed, bits, cols), levels)


def _linears(cm):
    return {n: r for n, r in cm.records.items() if r.kind == "linear"}


@pytest.mark.parametrize(
    "raw", [{"method": "int8"}, {"method": "int4", "group_size": 16}, {"method": "int3", "group_size": 32}]
)
def test_rtn_error_within_half_a_step(llama, raw):
    cm = compress(llama, parse_config("q", raw))
    src = dict(llama.named_modules())
    bits = {"int8": 8, "int4": 4, "int3": 3}[raw["method"]]
    assert _linears(cm) and "lm_head" not in cm.records  # head is optional, off by default
    for name, rec in cm.records.items():
        w = src[name].weight.detach()
        q = rec.quant
        assert q.bits == bits and q.group_size == (w.shape[1] if bits == 8 else raw["group_size"])
        step = q.scales.repeat_interleave(q.group_size, dim=1)
        assert torch.all((w - cm.weight_of(name)).abs() <= step / 2 * (1 + 1e-5) + 1e-12), name
        # symmetric absmax scale: the largest |w| of every group lands exactly on +-qmax
        assert torch.allclose(q.scales, w.abs().view(w.shape[0], -1, q.group_size).amax(-1) / qmath.qmax(bits))
        values = q.levels.int() - 2 ** (bits - 1)
        assert values.abs().max() <= qmath.qmax(bits)


def test_gptq_stays_on_grid_and_beats_rtn_on_its_hessian():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs: where GPTQ helps
    h = x.T @ x / x.shape[0]
    levels, scales = gptq(w, h, bits=4, group_size=16, damp=0.01, block_size=32)
    q = qmath.dequantize(levels, scales, 4)
    assert (levels.int() - 8).abs().max() <= 7
    rtn_scales = qmath.group_scales(w, 4, 16)
    rtn = qmath.dequantize(qmath.quantize(w, rtn_scales, 4), rtn_scales, 4)
    err = lambda v: ((x @ (w - v).T) ** 2).mean()  # noqa: E731
    assert err(q) < 0.7 * err(rtn)


def test_gptq_respects_masks():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    mask = torch.rand(8, 32) > 0.5
    w = w * mask
    x = torch.randn(200, 32)
    levels, scales = gptq(w, x.T @ x / 200, bits=4, group_size=8, mask=mask)
    assert torch.all(qmath.dequantize(levels, scales, 4)[~mask] == 0)


def test_int4_gptq_on_model_is_used_with_calibration(llama, calib, inputs, run):
    cm_gptq = compress(llama, parse_config("q", {"method": "int4", "group_size": 16}), calib)
    assert cm_gptq.info["steps"][0]["algorithm"] == "gptq"
    cm_gptq.verify()
    cm_rtn = compress(llama, parse_config("q", {"method": "int4", "group_size": 16, "algorithm": "rtn"}))
    ref = run(llama, inputs)
    assert run(cm_gptq.model, inputs).sub(ref).abs().max() < 1.0
    assert run(cm_rtn.model, inputs).sub(ref).abs().max() < 1.0


def test_packed_bytes_really_shrink(llama):
    names = compress(llama, {"method": "int8"}).records
    fp32 = sum(m.weight.numel() * 4 for n, m in llama.named_modules() if n in names)
    for raw, ratio in [
        ({"method": "int8"}, 1 / 4),
        ({"method": "int4", "group_size": 32}, 1 / 8),
        ({"method": "int3", "group_size": 32}, 3 / 32),
    ]:
        cm = compress(llama, raw)

        tensors, _, _ = deploy_tensors(cm)
        packed = sum(t.numel() for k, t in tensors.items() if k.endswith(".packed"))
        scales = sum(t.numel() * 4 for k, t in tensors.items() if k.endswith(".scales"))
        assert packed == pytest.approx(fp32 * ratio, rel=1e-6)
        assert scales < 0.15 * fp32
        assert (
            summarize(cm)["bytes_on_disk"]
            < summarize(compress(llama, {"method": "unstructured", "sparsity": 0.01}))["bytes_on_disk"]
        )


def test_deploy_form_runs_packed_weights_and_matches_train(llama, inputs, run):
    cm = compress(llama, {"method": "int4", "group_size": 16, "embeddings": True})
    dep = cm.deploy_model()
    mods = dict(dep.named_modules())
    assert isinstance(mods["model.layers.0.mlp.down_proj"], QuantLinear)
    assert isinstance(mods["model.embed_tokens"], QuantEmbedding)
    assert isinstance(mods["lm_head"], QuantLinear)  # tied head shares the packed embedding
    assert mods["lm_head"].packed is mods["model.embed_tokens"].packed
    assert not any(isinstance(m, torch.nn.Linear) for m in dep.modules())
    q = mods["model.layers.0.mlp.down_proj"]
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == q.in_features * q.out_features // 2
    torch.testing.assert_close(run(dep, inputs), run(cm.model, inputs), rtol=1e-5, atol=1e-5)


def test_embeddings_option_on_untied_model(make_model, inputs, run):
    model = make_model("qwen2")
    cm = compress(model, {"method": "int8", "embeddings": True})
    assert {"model.embed_tokens", "lm_head"} <= set(cm.records)
    assert cm.records["model.embed_tokens"].kind == "embedding"
    torch.testing.assert_close(run(cm.deploy_model(), inputs), run(cm.model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nf4 is bitsandbytes on CUDA only")
def test_nf4_on_cuda(llama, inputs, run):
    pytest.importorskip("bitsandbytes")
    cm = compress(llama, {"method": "nf4"})
    rec = next(iter(cm.records.values())).quant
    assert rec.codebook == "nf4" and rec.bits == 4 and int(rec.levels.max()) <= 15
    cm.verify()
    torch.testing.assert_close(run(cm.deploy_model(), inputs), run(cm.model, inputs), rtol=1e-5, atol=1e-5)
