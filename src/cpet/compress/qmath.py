"""Quantization arithmetic and bit packing: pure tensor functions, no modules.

A quantized matrix ``W [rows, cols]`` is ``levels`` (uint8, one per weight) plus ``scales``
(float32 ``[rows, cols // group_size]``): ``W ~= value(levels) * scale`` where ``value`` is the
symmetric integer grid ``level - 2**(bits-1)`` (levels ``1 .. 2**bits - 1``, so 0 is exact and
the grid is ``-qmax .. qmax`` with ``qmax = 2**(bits-1) - 1``) or a codebook (NF4). The same
:func:`dequantize` builds the training-form weights and runs in the deployment modules, so the
two forms hold bit-identical weights.

Packing stores ``bits`` bits per level, least significant bit first, each row padded to whole
bytes (so embedding rows can be gathered without unpacking the matrix).
"""

from __future__ import annotations

import torch

# NF4 levels (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses). Index 7 is exactly 0.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
CODEBOOKS = {"nf4": NF4}


def qmax(bits: int) -> int:
    """Largest level magnitude of the symmetric grid (127 for int8, 7 for int4, 3 for int3)."""
    return 2 ** (bits - 1) - 1


def zero_level(bits: int, codebook: str | None = None) -> int:
    """The level whose value is exactly 0 (what pruned weights are stored as)."""
    return CODEBOOKS[codebook].index(0.0) if codebook else 2 ** (bits - 1)


def group_scales(w: torch.Tensor, bits: int, group_size: int, codebook: str | None = None) -> torch.Tensor:
    """Symmetric absmax scales ``[rows, cols // group_size]`` (float32); all-zero groups get 1."""
    rows, cols = w.shape
    amax = w.detach().float().abs().reshape(rows, cols // group_size, group_size).amax(-1)
    top = 1.0 if codebook else float(qmax(bits))
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize(w: torch.Tensor, scales: torch.Tensor, bits: int, codebook: str | None = None) -> torch.Tensor:
    """Round ``w`` to the nearest level given ``scales``; returns uint8 levels of ``w``'s shape."""
    rows, cols = w.shape
    groups = scales.shape[1]
    x = w.detach().float().reshape(rows, groups, cols // groups) / scales.unsqueeze(-1)
    if codebook:
        table = torch.tensor(CODEBOOKS[codebook], device=w.device)
        levels = (x.unsqueeze(-1) - table).abs().argmin(-1)
    else:
        q = qmax(bits)
        levels = torch.round(x).clamp_(-q, q) + 2 ** (bits - 1)
    return levels.reshape(rows, cols).to(torch.uint8)


def dequantize(
    levels: torch.Tensor, scales: torch.Tensor, bits: int, codebook: str | None = None, dtype=torch.float32
) -> torch.Tensor:
    """``value(levels) * scale`` as a ``dtype`` matrix; in-place ops (much faster on CPU)."""
    rows, cols = levels.shape
    groups = scales.shape[1]
    if codebook:
        w = torch.tensor(CODEBOOKS[codebook], device=levels.device)[levels.long()]
    else:
        w = levels.to(torch.float32).sub_(2 ** (bits - 1))
    w.view(rows, groups, cols // groups).mul_(scales.unsqueeze(-1))
    return w if dtype == torch.float32 else w.to(dtype)


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``levels [rows, cols]`` into ``[rows, ceil(cols * bits / 8)]`` bytes, LSB first."""
    rows, cols = levels.shape
    if bits == 8:
        return levels.to(torch.uint8).contiguous()
    dev = levels.device
    if 8 % bits == 0:  # 1, 2, 4 bits: whole levels per byte
        per = 8 // bits
        x = torch.nn.functional.pad(levels.to(torch.int32), (0, (-cols) % per)).view(rows, -1, per)
        return (x << (torch.arange(per, device=dev, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)
    bitmat = (levels.to(torch.int32).unsqueeze(-1) >> torch.arange(bits, device=dev, dtype=torch.int32)) & 1
    bitmat = torch.nn.functional.pad(bitmat.reshape(rows, cols * bits), (0, (-cols * bits) % 8)).view(rows, -1, 8)
    return (bitmat << torch.arange(8, device=dev, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 levels ``[rows, cols]``."""
    rows = packed.shape[0]
    if bits == 8:
        return packed
    dev = packed.device
    if bits == 4:  # fast path (stack beats broadcast shifts ~6x on CPU)
        return torch.stack((packed & 15, packed >> 4), -1).view(rows, -1)[:, :cols]
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=dev, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).view(rows, -1)[:, :cols]
    bitmat = (packed.unsqueeze(-1) >> torch.arange(8, device=dev, dtype=torch.uint8)) & 1
    bitmat = bitmat.view(rows, -1)[:, : cols * bits].reshape(rows, cols, bits).to(torch.int32)
    return (bitmat << torch.arange(bits, device=dev, dtype=torch.int32)).sum(-1).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool matrix as one bit per entry."""
    return pack(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return unpack(packed, 1, cols).bool()
