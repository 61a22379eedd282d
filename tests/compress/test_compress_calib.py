"""Calibration plumbing: block-by-block replay sees what a full pass sees; padding is ignored."""

from __future__ import annotations

import pytest
import torch

from cpet.compress import calib as calibration
from cpet.compress.arch import find_attentions, find_ffns, linear_layers


def _sumsq(model, batches, sequential):
    targets = linear_layers(model)
    out = {}
    if sequential:
        calibration.sequential_stats(
            model, batches, targets,
            new=lambda m: [torch.zeros(m.in_features), 0],
            add=lambda s, x: (s[0].add_(x.square().sum(0)), s.__setitem__(1, s[1] + x.shape[0])),
            process=lambda n, m, s: out.__setitem__(n, s),
        )  # fmt: skip
    else:

        def add(n, x):
            s = out.setdefault(n, [torch.zeros(x.shape[1]), 0])
            s[0].add_(x.square().sum(0))
            s[1] += x.shape[0]

        calibration.run(model, batches, targets, add)
    return out


def test_blockwise_replay_matches_a_full_pass(llama, calib):
    full, seq = _sumsq(llama, calib, False), _sumsq(llama, calib, True)
    assert full.keys() == seq.keys() and len(full) == 14
    for n in full:
        assert full[n][1] == seq[n][1] == 8 * 16 - 5  # real tokens only
        torch.testing.assert_close(full[n][0], seq[n][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sequential", [False, True])
def test_padding_tokens_are_ignored(llama, sequential):
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], 1).long()}  # fmt: skip
    a = _sumsq(llama, [{"input_ids": ids}], sequential)
    b = _sumsq(llama, [padded], sequential)
    for n in a:
        assert a[n][1] == b[n][1] == 10
        torch.testing.assert_close(a[n][0], b[n][0], rtol=1e-4, atol=1e-5)


def test_architecture_discovery(make_model):
    llama = make_model("llama")
    attns, fused = find_attentions(llama)
    assert [(a.q, a.k, a.v, a.o) for a in attns] == [("q_proj", "k_proj", "v_proj", "o_proj")] * 2 and not fused
    ffns = find_ffns(llama)
    assert [(f.gate, f.up, f.down, f.act) for f in ffns] == [("gate_proj", "up_proj", "down_proj", "act_fn")] * 2
    neox = make_model("neox")
    attns, fused = find_attentions(neox)
    assert not attns and fused == ["gpt_neox.layers.0.attention", "gpt_neox.layers.1.attention"]
    assert [(f.gate, f.up, f.down) for f in find_ffns(neox)] == [(None, "dense_h_to_4h", "dense_4h_to_h")] * 2
    mha = make_model("llama", num_key_value_heads=4, hidden_size=64, num_attention_heads=4)  # square q/k/v/o
    assert [(a.q, a.o) for a in find_attentions(mha)[0]] == [("q_proj", "o_proj")] * 2
