"""GPTQ: column-by-column rounding with second-order error compensation.

A compact hand implementation of Frantar et al., "GPTQ" (ICLR 2023), Algorithm 1 with lazy
block updates, group-wise scales found when a group's first column is reached, and no
act-order. Nothing in the installed stack runs GPTQ on arbitrary HF models on CPU (auto-gptq
/ gptqmodel / optimum's GPTQ need CUDA kernels), hence this ~60-line version.

Given the layer-input Hessian ``H = X^T X / n`` it quantizes column ``i``, and spreads the
rounding error over the not-yet-quantized columns through the upper Cholesky factor of
``H^-1``. With a ``mask`` (pruned earlier) masked weights are quantized to exactly zero and
their error is compensated like any other (as SparseGPT does).
"""

from __future__ import annotations

import torch

from cpet.compress import qmath


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    dead = torch.diag(h) == 0  # inputs that never fire: any weight is as good, keep RTN
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * torch.diag(h).mean()
    for _ in range(6):  # raise damping until the factorization succeeds
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        lam = lam * 10
    raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    mask: torch.Tensor | None = None,
    codebook: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight [rows, cols]``; returns uint8 levels and float32 scales ``[rows, cols // group_size]``."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    hinv = _inverse_cholesky(hessian.float().to(w.device), damp)
    levels = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows, cols // group_size, device=w.device)
    zero = qmath.zero_level(bits, codebook)
    block = -(-max(block_size, group_size) // group_size) * group_size  # groups never straddle blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                grp = w1[:, i : i + group_size]
                if mask is not None:
                    grp = grp * mask[:, col : col + group_size]
                scales[:, col // group_size] = qmath.group_scales(grp, bits, group_size, codebook)[:, 0]
            s = scales[:, col // group_size : col // group_size + 1]
            lv = qmath.quantize(w1[:, i : i + 1], s, bits, codebook)
            if mask is not None:
                lv[~mask[:, col : col + 1]] = zero
            q = qmath.dequantize(lv, s, bits, codebook)[:, 0]
            levels[:, col] = lv[:, 0]
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return levels, scales
