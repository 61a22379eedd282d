"""Structured pruning: remove whole KV groups and FFN neurons; the matrices really shrink.

Units and their importance (``activation``, from calibration; ``magnitude`` assumes unit
input covariance instead):

* KV group ``g`` = KV head ``g`` plus the query heads sharing it (contiguous in HF's
  ``repeat_kv`` layout). Importance = energy of its output contribution
  ``sum_t ||W_o[:, cols_h] x_t[cols_h]||^2 = trace(W_h G_hh W_h^T)`` summed over its query heads,
  with ``G = X^T X`` of the o-projection input. Removing whole groups keeps GQA consistent.
* FFN neuron ``j``: ``||W_down[:, j]||^2 * sum_t x_tj^2`` (down-projection input).

A unit with zero importance contributes nothing, so removing only such units leaves the
outputs unchanged. The same number of units is removed in every layer, so the result is a
standard HF model with a changed config (``num_attention_heads``, ``num_key_value_heads``,
``head_dim`` kept, ``intermediate_size``) that vanilla ``from_pretrained`` (and ONNX export)
loads. ``kept`` records, per module name, which output rows (``out``) or input columns (``in``)
survived, so adapters trained on the original can be sliced the same way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.modeling_utils import no_init_weights

from cpet.compress import calib as calibration
from cpet.compress.arch import find_attentions, find_ffns
from cpet.compress.config import StructuredConfig
from cpet.compress.core import Calibration, CompressedModel, freeze, require_calib
from cpet.compress.registry import STRUCTURED, Method, register
from cpet.errors import CpetError

FFN_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def _collect(model, calib, attns, ffns) -> dict[str, torch.Tensor]:
    """Second moments of o-projection inputs (full) and down-projection inputs (diagonal)."""
    full = {f"{a.name}.{a.o}": getattr(a.module, a.o) for a in attns}
    diag = {f"{f.name}.{f.down}": f.child("down") for f in ffns}
    stats: dict[str, torch.Tensor] = {}

    def add(name, x):
        val = x.T @ x if name in full else x.square().sum(0)
        stats[name] = stats[name] + val if name in stats else val

    calibration.run(model, calib, {**full, **diag}, add)
    return stats


def _top(importance: torch.Tensor, keep: int) -> torch.Tensor:
    return importance.topk(keep).indices.sort().values.cpu()


def plan(cfg: StructuredConfig, model: nn.Module, calib: Calibration | None) -> tuple[dict, dict]:
    """Which rows/columns to keep per module (``kept``) and the config changes."""
    attns, fused = find_attentions(model) if cfg.heads_ratio else ([], [])
    if cfg.heads_ratio and not attns:
        why = f"fused QKV projection ({fused[0]}) is not supported" if fused else "no separate q/k/v/o projections"
        raise CpetError(f"{cfg.key('heads_ratio')}: cannot remove heads from {type(model).__name__}: {why}")
    ffns = find_ffns(model) if cfg.ffn_ratio else []
    if cfg.ffn_ratio and not ffns:
        raise CpetError(f"{cfg.key('ffn_ratio')}: no FFN module recognised in {type(model).__name__}")
    stats = _collect(model, calib, attns, ffns) if cfg.importance == "activation" else {}
    kept: dict[str, dict[str, list[int]]] = {}
    changes: dict[str, int] = {}
    if attns:
        a0 = attns[0]
        groups = a0.num_kv_heads - round(cfg.heads_ratio * a0.num_kv_heads)
        if groups < 1:
            raise cfg.error("heads_ratio", f"would remove all {a0.num_kv_heads} KV groups")
        rep = a0.num_heads // a0.num_kv_heads
        changes |= {"num_attention_heads": groups * rep, "num_key_value_heads": groups, "head_dim": a0.head_dim}
        for a in attns:
            hd = a.head_dim
            w = getattr(a.module, a.o).weight.detach().float().view(-1, a.num_heads, hd)  # [hidden, heads, hd]
            g = stats.get(f"{a.name}.{a.o}")
            if g is None:
                imp = w.square().sum((0, 2))
            else:
                g = (
                    g.view(a.num_heads, hd, a.num_heads, hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
                )  # [heads, hd, hd]
                imp = torch.einsum("ohd,hde,ohe->h", w, g, w)
            keep = _top(imp.view(a.num_kv_heads, rep).sum(1), groups)
            q_idx = (keep[:, None] * rep * hd + torch.arange(rep * hd)).reshape(-1).tolist()
            kv_idx = (keep[:, None] * hd + torch.arange(hd)).reshape(-1).tolist()
            kept[f"{a.name}.{a.q}"] = {"out": q_idx}
            kept[f"{a.name}.{a.k}"] = {"out": kv_idx}
            kept[f"{a.name}.{a.v}"] = {"out": kv_idx}
            kept[f"{a.name}.{a.o}"] = {"in": q_idx}
    if ffns:
        width = ffns[0].width
        neurons = width - round(cfg.ffn_ratio * width)
        if neurons < 1:
            raise cfg.error("ffn_ratio", f"would remove all {width} FFN neurons")
        key = next((k for k in FFN_WIDTH_KEYS if getattr(model.config, k, None) == width), None)
        if key is None:
            raise CpetError(
                f"{cfg.key('ffn_ratio')}: no config field of {type(model.config).__name__} holds the FFN width {width}"
            )
        changes[key] = neurons
        for f in ffns:
            imp = f.child("down").weight.detach().float().square().sum(0)
            if f"{f.name}.{f.down}" in stats:
                imp = imp * stats[f"{f.name}.{f.down}"]
            keep = _top(imp, neurons).tolist()
            for role in ("gate", "up"):
                if getattr(f, role):
                    kept[f"{f.name}.{getattr(f, role)}"] = {"out": keep}
            kept[f"{f.name}.{f.down}"] = {"in": keep}
    return kept, changes


def slice_state(state: dict[str, torch.Tensor], kept: dict[str, dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Apply a ``kept`` map to a state dict (weights and biases of the named modules)."""
    out = {}
    for key, t in state.items():
        mod, _, pname = key.rpartition(".")
        spec = kept.get(mod, {})
        if "out" in spec:
            t = t.index_select(0, torch.tensor(spec["out"], device=t.device))
        if "in" in spec and pname == "weight":
            t = t.index_select(1, torch.tensor(spec["in"], device=t.device))
        out[key] = t
    return out


def rebuild(model: nn.Module, kept: dict, changes: dict) -> nn.Module:
    """A fresh model of the same class from the changed config, holding the sliced weights."""
    config = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(config, k, v)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with no_init_weights():
        new = type(model)(config)
    new.tie_weights()  # skipped by no_init_weights
    new.to(device=device, dtype=dtype)
    try:
        new.load_state_dict(slice_state(model.state_dict(), kept), strict=True)
    except RuntimeError as exc:
        raise CpetError(
            f"structured pruning: {type(model).__name__} rebuilt from the changed config {changes} "
            f"does not have the sliced shapes (this architecture may ignore head_dim): {str(exc)[:300]}"
        ) from None
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return freeze(new)


def apply_structured(cm: CompressedModel, cfg: StructuredConfig, calib: Calibration | None) -> dict:
    if cfg.importance == "activation":
        require_calib(cfg, "importance", "activation", calib)
    if cm.records:
        raise CpetError(f"{cfg.key('method')}: structured pruning must come before quantization and masks")
    kept, changes = plan(cfg, cm.model, calib)
    cm.model = rebuild(cm.model, kept, changes)
    cm.info.setdefault("kept", {}).update(kept)
    return {"importance": cfg.importance, "config_changes": changes}


register(Method("structured", StructuredConfig, apply_structured, STRUCTURED, "remove KV groups and FFN neurons"))
