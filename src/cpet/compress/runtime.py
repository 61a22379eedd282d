"""Deployment-form modules: run on packed integer weights (activations float, or int8 per token for w8a8).

``QuantLinear`` keeps ``packed`` levels (1 byte per weight for int8, two per byte for int4
and int3: 3-bit levels are 3 bits on disk but nibbles in memory, 10x faster to unpack) and
float32 ``scales``, and dequantizes with the very function that
built the training-form weights, so both forms compute the same thing (bit-identical weights;
outputs differ only by float summation order, if at all). Memory holds the packed form; a
dequantized copy exists only during a call.

Measured on this 2-core Zen 4 CPU (torch 2.13, 1536x576 fp32 weight): ``F.linear`` with the
float weight 70 us at 1 token / 710 us at 64 tokens; dequantize-then-linear (int8) ~130 us /
~780 us; ``torch._weight_int8pack_mm`` works on CPU but is 500 us / 24 ms with fp32 inputs
(a reference path) and only fast with bf16 inputs (28 us / 780 us), which changes the
numerics, so it is not used. Real int8 speed comes from ONNX Runtime (MatMulNBits); this
module is the exact, memory-saving torch path.

Pruned (sparse) float weights are deployed dense: no CPU kernel runs them faster.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cpet.compress import qmath
from cpet.compress.arch import is_projection, parent_of, projection
from cpet.compress.core import QuantRecord, WeightRecord, freeze
from cpet.compress.w8a8 import fake_quant


class _Packed(nn.Module):
    def __init__(self, rows: int, cols: int, quant: QuantRecord, dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.group_size, self.codebook, self.dtype = quant.bits, quant.group_size, quant.codebook, dtype
        self.rows, self.cols = rows, cols
        self.store_bits = 4 if quant.bits == 3 else quant.bits  # 3-bit levels live in nibbles: fast unpack
        self.register_buffer("packed", qmath.pack(quant.levels, self.store_bits))
        self.register_buffer("scales", quant.scales.float().contiguous())

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight matrix (or only ``rows`` of it)."""
        packed, scales = (self.packed, self.scales) if rows is None else (self.packed[rows], self.scales[rows])
        levels = qmath.unpack(packed, self.store_bits, self.cols)
        return qmath.dequantize(levels, scales, self.bits, self.codebook, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.cols}, {self.rows}, bits={self.bits}, group_size={self.group_size}, codebook={self.codebook}"


class QuantLinear(_Packed):
    """Quantized replacement of a projection (``nn.Linear``, ``Conv1D``): weight-only, or with
    ``act="per-token"`` int8 activations too (:mod:`cpet.compress.w8a8`), as in training form."""

    def __init__(self, linear: nn.Module, quant: QuantRecord, act: str | None = None,
                 act_scale: float | None = None) -> None:
        p = projection(linear)
        super().__init__(p.out_features, p.in_features, quant, p.weight.dtype)
        self.in_features, self.out_features = p.in_features, p.out_features
        self.bias = None if p.bias is None else nn.Parameter(p.bias.detach().clone(), requires_grad=False)
        self.act, self.act_scale = act, act_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = fake_quant(x, self.act_scale)
        return torch.nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class QuantEmbedding(_Packed):
    """Weight-only quantized replacement of ``nn.Embedding``: dequantizes only the looked-up rows."""

    def __init__(self, emb: nn.Embedding, quant: QuantRecord) -> None:
        super().__init__(emb.num_embeddings, emb.embedding_dim, quant, emb.weight.dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantized_weight(ids.reshape(-1)).view(*ids.shape, self.cols)


def to_deploy(model: nn.Module, records: dict[str, WeightRecord]) -> nn.Module:
    """A frozen copy of ``model`` whose quantized weights run from packed storage.

    Tied weights (input embedding = output head) share one packed buffer.
    """
    deploy = copy.deepcopy(model)
    owners: dict[int, list[str]] = {}
    for name, mod in deploy.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if (is_projection(mod) or isinstance(mod, nn.Embedding)) and isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    for name, rec in records.items():
        if rec.quant is None:
            continue
        shared: dict[str, torch.Tensor] = {}
        for owner in owners[id(deploy.get_submodule(name).weight)]:
            old = deploy.get_submodule(owner)
            new = (QuantEmbedding(old, rec.quant) if isinstance(old, nn.Embedding)
                   else QuantLinear(old, rec.quant, rec.act, rec.act_scale))
            for key in ("packed", "scales"):
                shared.setdefault(key, getattr(new, key))
                setattr(new, key, shared[key])
            parent, child = parent_of(deploy, owner)
            setattr(parent, child, new)
    return freeze(deploy)
