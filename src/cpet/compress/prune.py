"""Mask pruning: ``unstructured`` (magnitude or Wanda) and ``2:4`` / ``nm`` (N:M semi-structured).

Scores: magnitude ``|W|``, or Wanda ``|W_ij| * ||X_j||_2`` (Sun et al. 2024) where ``X_j`` is
input channel ``j`` over the calibration tokens, collected block by block so later layers see
earlier pruning. Pruned weights are set to zero and the boolean mask is kept in the record.

How masks survive training: the training form freezes every base weight (LoRA trains only its
own A/B), so nothing writes to pruned positions; :meth:`CompressedModel.verify` checks it
(tests do, after an optimizer step on a peft-wrapped model). No parametrization or hook is
attached: both would change state-dict names or be lost on ``deepcopy``. Merging a LoRA into
the base weights would fill the zeros; deployment keeps adapters unmerged or re-masks.

On CPU the deployment form gains only disk size (bitmask + values); PyTorch has no CPU
kernel that runs a sparse or 2:4 matrix faster than a dense one.
"""

from __future__ import annotations

import torch
from torch import nn

from cpet.compress import calib as calibration
from cpet.compress.arch import linear_layers, matrix, projection
from cpet.compress.config import NMConfig, UnstructuredConfig
from cpet.compress.core import Calibration, CompressedModel, WeightRecord, require_calib, require_targets
from cpet.compress.registry import PRUNING, Method, register


def unstructured_mask(score: torch.Tensor, sparsity: float, granularity: str) -> torch.Tensor:
    """Keep all but the ``round(sparsity * n)`` lowest scores of each row (or of the matrix)."""
    flat = score if granularity == "row" else score.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every run of ``m`` consecutive inputs of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.view(rows, cols)


def set_mask(cm: CompressedModel, name: str, module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the pruned weights and remember the mask."""
    with torch.no_grad():
        w = matrix(module)
        w.mul_(mask.to(w.dtype))
    cm.records.setdefault(name, WeightRecord("linear")).mask = mask


def _prune(cm: CompressedModel, cfg, calib: Calibration | None, make_mask) -> dict:
    if cfg.score == "wanda":
        require_calib(cfg, "score", "wanda", calib)
    targets = require_targets(cm, cfg, linear_layers(cm.model, cfg.exclude))
    if cfg.score == "magnitude":
        for name, mod in targets.items():
            set_mask(cm, name, mod, make_mask(matrix(mod).detach().abs().float()))
    else:

        def add(state, x):
            state[0] += x.square().sum(0)

        def process(name, mod, state):
            score = matrix(mod).detach().abs().float() * state[0].sqrt().unsqueeze(0)
            set_mask(cm, name, mod, make_mask(score))

        new = lambda m: [torch.zeros(projection(m).in_features, device=m.weight.device)]  # noqa: E731
        calibration.sequential_stats(cm.model, calib, targets, new, add, process)
    kept = sum(int(cm.records[n].mask.sum()) for n in targets)
    total = sum(m.weight.numel() for m in targets.values())
    return {"score": cfg.score, "pruned_layers": len(targets), "sparsity": 1 - kept / total}


def apply_unstructured(cm: CompressedModel, cfg: UnstructuredConfig, calib: Calibration | None) -> dict:
    return _prune(cm, cfg, calib, lambda s: unstructured_mask(s, cfg.sparsity, cfg.granularity))


def apply_nm(cm: CompressedModel, cfg: NMConfig, calib: Calibration | None) -> dict:
    for name, mod in linear_layers(cm.model, cfg.exclude).items():
        if projection(mod).in_features % cfg.m:
            raise cfg.error(
                "m",
                f"must divide the input width of every pruned layer; {cfg.m} does not divide "
                f"{projection(mod).in_features} ({name})",
            )
    out = _prune(cm, cfg, calib, lambda s: nm_mask(s, cfg.n, cfg.m))
    return {**out, "n": cfg.n, "m": cfg.m}


register(
    Method("unstructured", UnstructuredConfig, apply_unstructured, PRUNING, "magnitude / Wanda unstructured masks")
)
register(Method("2:4", NMConfig, apply_nm, PRUNING, "2:4 semi-structured masks"))
register(Method("nm", NMConfig, apply_nm, PRUNING, "N:M semi-structured masks"))
