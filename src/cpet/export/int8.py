"""w8a8 layers as ONNX Runtime integer GEMMs: int8 activations (per token or static), our int8 weights.

One :class:`Int8Linear` traces into (``Y = X W^T``, ``X [..., K]``, our levels ``W_q [N, K]`` and
per-channel scales ``w_s [N]``)::

    s   = Max(ReduceMax(Abs(X), -1), eps) / 127               # per row (token)
    X_u = Cast<uint8>(Round(X / s) + 128)                     # -127..127 stored with zero point 128
    Y   = Cast<float>(MatMulInteger(X_u, W_q^T, 128)) * s * w_s (+ bias)

the same ops as :func:`cpet.compress.w8a8.quantize_tokens` and the training form's fake
quantization, so the exported graph and the training form differ only by float summation order.
With a static scale ``s`` (``activations: static``) it is ``QuantizeLinear(X, s, 128)``, the
``MatMulInteger`` and one ``Mul`` by the constant ``s * w_s``.
The activations are uint8 with zero point 128 and the weights int8, because that is ORT's fast
path: measured here (ORT 1.31, 2-core AMD EPYC), one 64 x 576 x 1536 product takes 0.27 ms as
this graph and 1.95 ms with int8 activations (s8 x s8), against 0.54 ms in fp32
(``python -m cpet.export.int8bench gemm``).
"""

from __future__ import annotations

import torch
from torch import nn

from cpet.compress.arch import projection
from cpet.compress.core import QuantRecord
from cpet.compress.w8a8 import EPS, QMAX, quantize_static, quantize_tokens
from cpet.errors import CpetError

ZERO_POINT = 128


def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


class _Int8MatMul(torch.autograd.Function):
    """PyTorch: ``(q * s) @ W^T`` from :func:`quantize_tokens`; ONNX: the module docstring's graph."""

    @staticmethod
    def forward(ctx, x, weight, wq_t, wscale, n):
        q, scale = quantize_tokens(x)
        return torch.nn.functional.linear(q * scale, weight)

    @staticmethod
    def symbolic(g, x, weight, wq_t, wscale, n):
        amax = g.op("ReduceMax", g.op("Abs", x), _const(g, [-1], torch.int64), keepdims_i=1)
        scale = g.op("Div", g.op("Max", amax, _const(g, EPS)), _const(g, QMAX))
        xq = g.op("Add", g.op("Round", g.op("Div", x, scale)), _const(g, float(ZERO_POINT)))
        xu = g.op("Cast", xq, to_i=2)  # TensorProto.UINT8
        yi = g.op("MatMulInteger", xu, wq_t, _const(g, ZERO_POINT, torch.uint8))
        y = g.op("Mul", g.op("Mul", g.op("Cast", yi, to_i=1), scale), wscale)  # 1 = FLOAT
        sizes = x.type().varyingSizes()
        if sizes:
            y.setType(x.type().with_sizes(sizes[:-1] + [n]))
        return y


class _StaticInt8MatMul(torch.autograd.Function):
    """A static activation scale ``s``: ``QuantizeLinear(X, s, 128)`` (round half to even,
    saturating), ``MatMulInteger``, one rescale by the constant vector ``s * w_s``."""

    @staticmethod
    def forward(ctx, x, weight, wq_t, rescale, scale, n):
        return torch.nn.functional.linear(quantize_static(x, scale) * scale, weight)

    @staticmethod
    def symbolic(g, x, weight, wq_t, rescale, scale, n):
        zero = _const(g, ZERO_POINT, torch.uint8)
        xu = g.op("QuantizeLinear", x, _const(g, scale), zero)
        y = g.op("Mul", g.op("Cast", g.op("MatMulInteger", xu, wq_t, zero), to_i=1), rescale)
        sizes = x.type().varyingSizes()
        if sizes:
            y.setType(x.type().with_sizes(sizes[:-1] + [n]))
        return y


class Int8Linear(nn.Module):
    """A w8a8 ``nn.Linear`` for ONNX export (one ``MatMulInteger``); the float weight is only used
    while tracing, the graph keeps the int8 levels ``[K, N]`` and the scales."""

    def __init__(self, linear: nn.Module, quant: QuantRecord, act_scale: float | None = None) -> None:
        super().__init__()
        self.act_scale = act_scale
        if quant.bits != 8 or quant.group_size != quant.levels.shape[1] or quant.codebook:
            raise CpetError(f"export: int8 activations need per-channel int8 weights, got {quant.meta()}")
        p = projection(linear)
        self.register_buffer("weight", quant.dequantize(p.weight.dtype))
        levels = quant.levels.to(torch.int16) - 128  # our level l means l - 128: -127..127
        self.register_buffer("wq_t", levels.to(torch.int8).T.contiguous())
        self.register_buffer("wscale", quant.scales.float().reshape(-1).contiguous())
        if act_scale is not None:  # static: one constant rescale vector s * w_s
            self.register_buffer("rescale", self.wscale * act_scale)
        self.bias = None if p.bias is None else nn.Parameter(p.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = p.in_features, p.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is None:
            y = _Int8MatMul.apply(x, self.weight, self.wq_t, self.wscale, self.out_features)
        else:
            y = _StaticInt8MatMul.apply(x, self.weight, self.wq_t, self.rescale, self.act_scale, self.out_features)
        return y if self.bias is None else y + self.bias
