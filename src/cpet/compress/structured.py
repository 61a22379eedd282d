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
``head_dim`` kept, and the FFN width under whichever of :data:`FFN_WIDTH_KEYS` the config has)
that vanilla ``from_pretrained`` (and ONNX export) loads. A model whose config cannot describe the
smaller shapes (fused QKV; head_dim derived from hidden_size / heads; FFN width hard-coded) is
refused with :class:`~cpet.errors.Unsupported` before anything is changed. ``kept`` records, per module name, which output rows (``out``) or input columns (``in``)
survived, so adapters trained on the original can be sliced the same way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.modeling_utils import no_init_weights

from cpet.compress import calib as calibration
from cpet.compress.arch import find_attentions, find_ffns, projection
from cpet.compress.config import StructuredConfig
from cpet.compress.core import Calibration, CompressedModel, freeze, refuse, require_calib
from cpet.compress.registry import STRUCTURED, Method, register
from cpet.errors import CpetError

#: config fields that hold the FFN width; a field present but None (GPT-2's n_inner) means a default
FFN_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")


def width_key(config, width: int) -> str | None:
    """The config field to write the new FFN width to: one holding ``width``, else one left at None."""
    present = [k for k in FFN_WIDTH_KEYS if hasattr(config, k)]
    return next((k for k in present if getattr(config, k) == width), None) or next(
        (k for k in present if getattr(config, k) is None), None)


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


def plan(cm: CompressedModel, cfg: StructuredConfig, calib: Calibration | None) -> tuple[dict, dict]:
    """Which rows/columns to keep per module (``kept``) and the config changes."""
    model = cm.model
    attns, fused = find_attentions(model) if cfg.heads_ratio else ([], [])
    if cfg.heads_ratio and not attns:
        why = (f"heads_ratio: its heads live in a fused QKV projection ({fused[0]}); only separate q/k/v/o "
               "projections can lose heads" if fused else "heads_ratio: no separate q/k/v/o projections found")
        raise refuse(cm, cfg, why)
    ffns = find_ffns(model) if cfg.ffn_ratio else []
    if cfg.ffn_ratio and not ffns:
        raise refuse(cm, cfg, "ffn_ratio: no FFN (up -> activation -> down projections) recognised")
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
            w = projection(getattr(a.module, a.o)).weight.detach().float().view(-1, a.num_heads, hd)  # [hidden, heads, hd]
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
        key = width_key(model.config, width)
        if key is None:
            raise refuse(cm, cfg, f"ffn_ratio: {type(model.config).__name__} has no field for the FFN width {width} "
                                  f"(none of {', '.join(FFN_WIDTH_KEYS)}), so a narrower FFN could not be reloaded")
        changes[key] = neurons
        for f in ffns:
            imp = f.proj("down").weight.detach().float().square().sum(0)
            if f"{f.name}.{f.down}" in stats:
                imp = imp * stats[f"{f.name}.{f.down}"]
            keep = _top(imp, neurons).tolist()
            for role in ("gate", "up"):
                if getattr(f, role):
                    kept[f"{f.name}.{getattr(f, role)}"] = {"out": keep}
            kept[f"{f.name}.{f.down}"] = {"in": keep}
    return kept, changes


def slice_state(state: dict[str, torch.Tensor], kept: dict[str, dict[str, list[int]]],
                transposed: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Apply a ``kept`` map to a state dict (weights and biases of the named modules); weights of
    the modules in ``transposed`` (``Conv1D``) are stored ``[in, out]``."""
    out = {}
    for key, t in state.items():
        mod, _, pname = key.rpartition(".")
        spec = kept.get(mod, {})
        flip = pname == "weight" and mod in transposed
        if "out" in spec:
            dim = 1 if flip else 0
            t = t.index_select(dim if pname == "weight" else 0, torch.tensor(spec["out"], device=t.device))
        if "in" in spec and pname == "weight":
            t = t.index_select(0 if flip else 1, torch.tensor(spec["in"], device=t.device))
        out[key] = t
    return out


def rebuild(cm: CompressedModel, cfg: StructuredConfig, kept: dict, changes: dict) -> nn.Module:
    """A fresh model of the same class from the changed config, holding the sliced weights."""
    model = cm.model
    config = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(config, k, v)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    transposed = {n for n, m in model.named_modules() if (p := projection(m)) is not None and p.transposed}
    try:
        with no_init_weights():
            new = type(model)(config)
        new.tie_weights()  # skipped by no_init_weights
        new.to(device=device, dtype=dtype)
        new.load_state_dict(slice_state(model.state_dict(), kept, transposed), strict=True)
    except (ValueError, RuntimeError) as exc:  # the class rejects the config, or builds other shapes
        raise refuse(cm, cfg, f"{type(model).__name__} built from the changed config {changes} does not have the "
                              f"sliced shapes (it derives them from other fields, e.g. head_dim from hidden_size / "
                              f"heads): {str(exc).splitlines()[0][:200]}") from None
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return freeze(new)


def apply_structured(cm: CompressedModel, cfg: StructuredConfig, calib: Calibration | None) -> dict:
    if cfg.importance == "activation":
        require_calib(cfg, "importance", "activation", calib)
    if cm.records:
        raise CpetError(f"{cfg.key('method')}: structured pruning must come before quantization and masks")
    kept, changes = plan(cm, cfg, calib)
    cm.model = rebuild(cm, cfg, kept, changes)
    cm.info.setdefault("kept", {}).update(kept)
    return {"importance": cfg.importance, "config_changes": changes}


register(Method("structured", StructuredConfig, apply_structured, STRUCTURED, "remove KV groups and FFN neurons"))
