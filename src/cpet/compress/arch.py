"""Find the parts compression needs in any HF causal LM, by type, shape and config: no module names.

* linear layers: every ``nn.Linear`` except the output head (unless asked);
* decoder blocks: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries;
* FFNs: a module whose only Linear children map hidden -> I (one, or two for gated) and
  I -> hidden, with one activation child; which input projection is the gate is decided by
  reproducing the module's output both ways (Llama-style gated and plain 2-layer MLPs);
* attention: a module with four Linear children shaped like q/k/v (hidden -> heads * head_dim)
  and o (heads * head_dim -> hidden); o is the one called last in a forward pass.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn


def hidden_size(config) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get else None


def excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def linear_layers(model: nn.Module, exclude: list[str] = (), include_head: bool = False) -> dict[str, nn.Linear]:
    """Linear modules by name (each weight once), the output head only if ``include_head``."""
    head = output_head(model)
    seen: set[int] = set()
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in seen or excluded(name, list(exclude)):
            continue
        if mod is head and not include_head:
            continue
        seen.add(id(mod.weight))
        out[name] = mod
    return out


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The list of transformer blocks, or None when no ModuleList has num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        return None
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@torch.no_grad()
def call_order(model: nn.Module) -> list[str]:
    """Names of Linear modules in the order a short forward pass calls them."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        dev = next(model.parameters()).device
        model(input_ids=torch.tensor([[1, 2, 3, 4]], device=dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return order


@dataclass
class FFN:
    """One feed-forward block: ``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``."""

    name: str
    module: nn.Module
    up: str  # child names
    down: str
    act: str
    gate: str | None = None

    @property
    def width(self) -> int:
        return getattr(self.module, self.down).in_features

    def child(self, role: str) -> nn.Linear:
        return getattr(self.module, getattr(self, role))


@torch.no_grad()
def _ffn_roles(name: str, mod: nn.Module, hidden: int) -> FFN | None:
    lin = {n: c for n, c in mod.named_children() if isinstance(c, nn.Linear)}
    other = {n: c for n, c in mod.named_children() if not isinstance(c, (nn.Linear, nn.Dropout))}
    downs = [n for n, c in lin.items() if c.out_features == hidden and c.in_features != hidden]
    if len(downs) != 1 or len(other) != 1 or len(lin) not in (2, 3):
        return None
    down = downs[0]
    width = lin[down].in_features
    ins = [n for n in lin if n != down]
    if any((lin[n].in_features, lin[n].out_features) != (hidden, width) for n in ins):
        return None
    act = next(iter(other))
    w = lin[down].weight
    x = torch.randn(3, hidden, device=w.device, dtype=w.dtype)
    was_training = mod.training
    mod.eval()
    try:
        ref = mod(x)
    except Exception:  # not a plain x -> y module after all
        return None
    finally:
        mod.train(was_training)
    candidates = (
        [FFN(name, mod, ins[0], down, act)]
        if len(ins) == 1
        else [FFN(name, mod, up, down, act, gate) for gate, up in (ins, ins[::-1])]
    )
    for ffn in candidates:
        h = ffn.child("up")(x)
        h = other[act](ffn.child("gate")(x)) * h if ffn.gate else other[act](h)
        if torch.allclose(lin[down](h), ref, rtol=1e-4, atol=1e-5):
            return ffn
    return None


def find_ffns(model: nn.Module) -> list[FFN]:
    """Every recognised FFN module, in model order."""
    hidden = hidden_size(model.config)
    found = []
    for name, mod in model.named_modules():
        ffn = _ffn_roles(name, mod, hidden)
        if ffn is not None:
            found.append(ffn)
    return found


@dataclass
class Attention:
    """Separate q/k/v/o projections of one attention module; heads of a KV group are contiguous."""

    name: str
    module: nn.Module
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


def find_attentions(model: nn.Module) -> tuple[list[Attention], list[str]]:
    """Recognised attention modules, and names of modules that look like fused-QKV attention."""
    cfg = model.config
    hidden = hidden_size(cfg)
    nh = int(cfg.num_attention_heads)
    nkv = int(getattr(cfg, "num_key_value_heads", None) or nh)
    hd = int(getattr(cfg, "head_dim", None) or hidden // nh)
    rank = {n: i for i, n in enumerate(call_order(model))}
    found, fused = [], []
    for name, mod in model.named_modules():
        lin = {n: c for n, c in mod.named_children() if isinstance(c, nn.Linear)}
        shapes = {n: (c.in_features, c.out_features) for n, c in lin.items()}
        if len(lin) == 2 and (hidden, (nh + 2 * nkv) * hd) in shapes.values():
            fused.append(name)
        if len(lin) != 4 or any(f"{name}.{n}" not in rank for n in lin):
            continue
        by_call = sorted(lin, key=lambda n: rank[f"{name}.{n}"])
        o, qkv = by_call[-1], by_call[:-1]
        if shapes[o] != (nh * hd, hidden):
            continue
        q = [n for n in qkv if shapes[n] == (hidden, nh * hd)]
        kv = [n for n in qkv if shapes[n] == (hidden, nkv * hd)]
        if nh == nkv:
            q, kv = qkv[:1], qkv[1:]
        if len(q) != 1 or len(kv) != 2:
            continue
        found.append(Attention(name, mod, q[0], kv[0], kv[1], o, nh, nkv, hd))
    return found, fused
