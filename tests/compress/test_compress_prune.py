"""Pruning: exact sparsity, N:M groups, Wanda, masks through a peft LoRA training step."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from cpet.compress import compress, parse_config, summarize
from cpet.compress.prune import nm_mask, unstructured_mask
from cpet.errors import CpetError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_unstructured_row_sparsity_is_exact(llama, calib, score):
    cm = compress(llama, parse_config("p", {"method": "unstructured", "sparsity": 0.5, "score": score}), calib)
    assert len(cm.records) == 14 and "lm_head" not in cm.records
    for name, rec in cm.records.items():
        w = cm.weight_of(name)
        assert torch.equal(w != 0, rec.mask)  # random weights are never exactly 0 otherwise
        assert torch.all((w == 0).sum(1) == round(0.5 * w.shape[1])), name
    assert summarize(cm)["sparsity"] == 0.5


def test_layer_granularity_and_kept_weights_unchanged(llama):
    cm = compress(llama, {"method": "unstructured", "sparsity": 0.3, "granularity": "layer"})
    src = dict(llama.named_modules())
    for name, rec in cm.records.items():
        w, orig = cm.weight_of(name), src[name].weight
        assert (~rec.mask).sum() == round(0.3 * w.numel())
        assert torch.equal(w[rec.mask], orig[rec.mask])
        assert orig[~rec.mask].abs().max() <= orig[rec.mask].abs().min()  # magnitude: smallest went


@pytest.mark.parametrize(
    "raw", [{"method": "2:4"}, {"method": "2:4", "score": "wanda"}, {"method": "nm", "n": 1, "m": 8}]
)
def test_nm_every_group_has_at_most_n_nonzeros(llama, calib, raw):
    cm = compress(llama, parse_config("p", raw), calib)
    n, m = raw.get("n", 2), raw.get("m", 4)
    for name in cm.records:
        w = cm.weight_of(name)
        groups = (w != 0).view(w.shape[0], -1, m).sum(-1)
        assert groups.max() <= n and groups.min() == n, name


def test_wanda_uses_activations(llama, calib):
    w = torch.full((4, 8), 0.5)
    w[:, [0, 7]] = 0.1  # smallest weights ...
    norms = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 100])  # ... on the loudest inputs
    assert not unstructured_mask(w, 0.5, "row")[:, [0, 7]].any()
    assert unstructured_mask(w * norms, 0.5, "row")[:, [0, 7]].all()
    assert nm_mask(w * norms, 2, 4)[:, [0, 7]].all()
    mag = compress(llama, {"method": "unstructured", "score": "magnitude"})
    wanda = compress(llama, {"method": "unstructured", "score": "wanda"}, calib)
    assert any(not torch.equal(mag.records[n].mask, wanda.records[n].mask) for n in mag.records)


def _train_step(model, ids, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return any(not torch.equal(b, p) for b, p in zip(before, params, strict=False))


@pytest.mark.parametrize(
    "raw",
    [
        {"method": "unstructured", "sparsity": 0.5},
        {"method": "2:4"},
        {"method": "int4", "group_size": 16},
        {"method": "mixed", "steps": [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}]},
    ],
)
def test_masks_and_grid_survive_lora_training(llama, inputs, raw):
    cm = compress(llama, parse_config("p", raw))
    cm.model = get_peft_model(cm.model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
    assert _train_step(cm.model, inputs)  # LoRA weights did move
    cm.verify()  # pruned weights still exactly zero, quantized weights still on their grid
    for name, rec in cm.records.items():
        if rec.mask is not None:
            assert torch.all(cm.weight_of(name)[~rec.mask] == 0)


def test_verify_catches_a_filled_mask(llama):
    cm = compress(llama, {"method": "2:4"})
    name, rec = next(iter(cm.records.items()))
    with torch.no_grad():
        cm.weight_of(name)[~rec.mask] = 1.0
    with pytest.raises(CpetError, match="pruned weights are no longer zero"):
        cm.verify()


def test_sparse_storage_shrinks_disk(llama):
    dense = summarize(compress(llama, {"method": "unstructured", "sparsity": 0.01}))["bytes_on_disk"]
    half = summarize(compress(llama, {"method": "unstructured", "sparsity": 0.5}))["bytes_on_disk"]
    both = summarize(compress(llama, {"method": "mixed", "steps": [{"method": "2:4"}, {"method": "int8"}]}))[
        "bytes_on_disk"
    ]
    assert half < 0.8 * dense and both < 0.5 * half
