"""Our quantized weights as ONNX Runtime ``MatMulNBits`` initializers, on *our* grid.

ORT's quantizers (``MatMulNBitsQuantizer``, ``quantize_dynamic``) would re-quantize the float
weights with their own scales and rounding; the adapters were trained on our exact grid, so the
initializers are built from the :class:`~cpet.compress.QuantRecord` instead.

``MatMulNBits`` (com.microsoft, checked on ORT 1.31 CPU): ``Y = A @ dequant(B)^T`` with
``dequant = (code - zero_point) * scale`` per block of ``block_size`` (a power of two >= 16)
along K; B is ``uint8 [N, ceil(K / block), block * bits / 8]``, codes packed low-first; scales
``[N, K / block]`` in A's dtype; without a ``zero_points`` input the zero point is
``2 ** (bits - 1)``. ORT 1.31 CPU accepts bits 2, 4 and 8 (3 is refused).

Our level ``l`` of a ``b``-bit record means ``l - 2 ** (b - 1)``; stored in a ``c``-bit container
(``c`` = the smallest of 2, 4, 8 that holds ``b``) as ``l - 2 ** (b - 1) + 2 ** (c - 1)``, so the
default zero point gives the very same integer: int3 levels 1..7 become 4-bit codes 5..11.
A group of ``g`` columns sharing one scale becomes ``g / block`` blocks with that scale repeated.
Both steps are exact, so ORT multiplies with bit-identical weight values.

``accuracy_level`` stays 0 (float activations): levels 1-4 make ORT quantize the *activations*
to int8, which our weight-only training never simulated (measured on random data here: error
x10^4 against level 0).
"""

from __future__ import annotations

import torch
from torch import nn

from cpet.compress import qmath
from cpet.compress.arch import projection
from cpet.compress.core import QuantRecord
from cpet.errors import CpetError

#: largest block: ORT's kernels take 16..256; 128 is what ORT's own quantizer uses by default
MAX_BLOCK = 128


def container_bits(bits: int) -> int:
    for c in (2, 4, 8):
        if bits <= c:
            return c
    raise CpetError(f"export: {bits}-bit weights do not fit MatMulNBits (at most 8 bits)")


def block_size(group_size: int, cols: int) -> int:
    """The largest power of two <= MAX_BLOCK dividing the group size (and so the row width)."""
    block = MAX_BLOCK
    while block >= 16:
        if group_size % block == 0 and cols % block == 0:
            return block
        block //= 2
    raise CpetError(f"export: group size {group_size} has no power-of-two block >= 16 dividing it; "
                    "MatMulNBits needs one (choose a group size that is a multiple of 16)")


def nbits_tensors(quant: QuantRecord) -> dict:
    """``blob``, ``scales`` and the attributes of one MatMulNBits node for ``quant``."""
    if quant.codebook:
        raise CpetError(f"export: codebook quantization ({quant.codebook}) has no MatMulNBits form")
    rows, cols = quant.levels.shape
    c = container_bits(quant.bits)
    block = block_size(quant.group_size, cols)
    codes = quant.levels.to(torch.int16) - 2 ** (quant.bits - 1) + 2 ** (c - 1)
    blob = qmath.pack(codes.to(torch.uint8), c).view(rows, cols // block, block * c // 8)
    scales = quant.scales.float().repeat_interleave(quant.group_size // block, dim=1)
    return {"blob": blob.contiguous(), "scales": scales.contiguous(),
            "K": cols, "N": rows, "bits": c, "block_size": block}


class _MatMulNBits(torch.autograd.Function):
    """Float matmul in PyTorch; one ``MatMulNBits`` node in the ONNX graph (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, x, weight, blob, scales, K, N, bits, block):  # noqa: N803 (ORT's attribute names)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def symbolic(g, x, weight, blob, scales, K, N, bits, block):  # noqa: N803
        y = g.op("com.microsoft::MatMulNBits", x, blob, scales, K_i=K, N_i=N, bits_i=bits,
                 block_size_i=block, accuracy_level_i=0)
        sizes = x.type().varyingSizes()  # tell the exporter the output shape: [..., N]
        if sizes:
            y.setType(x.type().with_sizes(sizes[:-1] + [N]))
        return y


class NBitsLinear(nn.Module):
    """A quantized ``nn.Linear`` for ONNX export: exports as MatMulNBits on the record's grid.

    The float weight (exactly ``quant.dequantize()``) is only used while tracing; the graph keeps
    just ``blob`` and ``scales``.
    """

    def __init__(self, linear: nn.Module, quant: QuantRecord) -> None:
        super().__init__()
        p = projection(linear)  # nn.Linear or Conv1D
        t = nbits_tensors(quant)
        self.K, self.N, self.bits, self.block = t["K"], t["N"], t["bits"], t["block_size"]
        self.register_buffer("weight", quant.dequantize(p.weight.dtype))
        self.register_buffer("blob", t["blob"])
        self.register_buffer("scales", t["scales"])
        self.bias = None if p.bias is None else nn.Parameter(p.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = p.in_features, p.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBits.apply(x, self.weight, self.blob, self.scales, self.K, self.N, self.bits, self.block)
        return y if self.bias is None else y + self.bias
