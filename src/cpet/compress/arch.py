"""Find the parts compression needs in any HF causal LM, by type, shape and config: no module names.

* projections: every module with a 2-D weight of known orientation (:data:`PROJECTIONS`:
  ``nn.Linear`` [out, in], transformers' ``Conv1D`` [in, out]); :func:`projection` gives one
  uniform ``[out, in]`` view of either, sharing storage, so every method reads and writes both alike;
* linear layers: every projection except the output head (unless asked);
* decoder blocks: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries;
* FFNs: up (and gate) projections hidden -> I and a down projection I -> hidden with an activation
  module beside them, in an ``.mlp``-like module or directly on the decoder layer (OPT); roles are
  confirmed on a real forward pass (``down`` input == ``act(up x)`` or ``act(gate x) * up x``);
* attention: a module with four projection children shaped like q/k/v (hidden -> heads * head_dim)
  and o (heads * head_dim -> hidden); o is the one called last in a forward pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Projection:
    """A uniform view of one projection module: ``y = x @ weight.T + bias``."""

    module: nn.Module
    weight: torch.Tensor  # [out, in], a view of the module's own parameter (writes go through)
    transposed: bool  # the module stores [in, out] (peft: fan_in_fan_out=True)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)


#: module type -> (its weight as [out, in], stored transposed?); the first isinstance match wins
PROJECTIONS: list[tuple[type[nn.Module], Callable[[nn.Module], torch.Tensor], bool]] = [
    (nn.Linear, lambda m: m.weight, False),
    (Conv1D, lambda m: m.weight.T, True),
]


def projection(module: nn.Module) -> Projection | None:
    """The ``[out, in]`` view of ``module`` if it is a known projection type, else None."""
    for cls, view, transposed in PROJECTIONS:
        if isinstance(module, cls) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return Projection(module, view(module), transposed)
    return None


def is_projection(module: nn.Module) -> bool:
    return projection(module) is not None


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as ``[out, in]``, of anything else (an embedding) as stored."""
    proj = projection(module)
    return proj.weight if proj is not None else module.weight


def projections(module: nn.Module) -> dict[str, Projection]:
    """Direct projection children of ``module`` by child name."""
    return {n: p for n, c in module.named_children() if (p := projection(c)) is not None}


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


def linear_layers(model: nn.Module, exclude: list[str] = (), include_head: bool = False) -> dict[str, nn.Module]:
    """Projection modules by name (each weight once), the output head only if ``include_head``."""
    head = output_head(model)
    seen: set[int] = set()
    out = {}
    for name, mod in model.named_modules():
        if not is_projection(mod) or id(mod.weight) in seen or excluded(name, list(exclude)):
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
def _probe(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """One short eval forward pass: per named module, its call rank, first input and output."""
    seen: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(mod, args, out):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = (len(seen), args[0], out[0] if isinstance(out, tuple) else out)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        model(input_ids=torch.tensor([[1, 2, 3, 4]], device=dev), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def call_order(model: nn.Module) -> list[str]:
    """Names of projection modules in the order a short forward pass calls them."""
    seen = _probe(model, {n: m for n, m in model.named_modules() if is_projection(m)})
    return sorted(seen, key=lambda n: seen[n][0])


@dataclass
class FFN:
    """One feed-forward block: ``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``.

    ``standalone``: ``module`` computes exactly this (an ``.mlp``), so it can be replaced whole;
    otherwise the roles sit on a larger module (OPT's decoder layer, or BLOOM's MLP that also adds
    the residual) and only the role children may be swapped.
    """

    name: str
    module: nn.Module
    up: str  # child names
    down: str
    act: str
    gate: str | None = None
    standalone: bool = True

    @property
    def width(self) -> int:
        return self.proj("down").in_features

    def child(self, role: str) -> nn.Module:
        return getattr(self.module, getattr(self, role))

    def proj(self, role: str) -> Projection:
        return projection(self.child(role))


def _activations(mod: nn.Module, taken: set[str]) -> list[str]:
    """Children that could be the activation: parameter-free, not dropout, not a projection."""
    return [n for n, c in mod.named_children()
            if n not in taken and not isinstance(c, nn.Dropout) and next(c.parameters(), None) is None]


def _ffn_candidates(name: str, mod: nn.Module, hidden: int) -> list[FFN]:
    """Role assignments the shapes allow; the forward pass decides which (if any) is right."""
    lin = projections(mod)
    out = []
    for down, p in lin.items():
        if p.out_features != hidden or p.in_features == hidden:
            continue
        ins = [n for n, q in lin.items() if (q.in_features, q.out_features) == (hidden, p.in_features)]
        if len(ins) not in (1, 2):
            continue
        rest = {n for n, c in mod.named_children() if n not in (*ins, down) and not isinstance(c, nn.Dropout)}
        pairs = [(ins[0], None)] if len(ins) == 1 else [(ins[1], ins[0]), (ins[0], ins[1])]  # (up, gate)
        for act in _activations(mod, {down, *ins}):
            for up, gate in pairs:
                out.append(FFN(name, mod, up, down, act, gate, standalone=rest == {act}))
    return out


def _full(ffn: FFN, role: str) -> str:
    """Module path of one role's projection."""
    return f"{ffn.name}.{getattr(ffn, role)}" if ffn.name else getattr(ffn, role)


@torch.no_grad()
def find_ffns(model: nn.Module) -> list[FFN]:
    """Every recognised FFN, in model order; roles confirmed on one forward pass."""
    hidden = hidden_size(model.config)
    cands = [f for n, m in model.named_modules() for f in _ffn_candidates(n, m, hidden)]
    watch = {_full(f, r): f.child(r) for f in cands for r in ("up", "down", "gate") if getattr(f, r)}
    watch |= {f.name: f.module for f in cands if f.standalone}
    seen = _probe(model, watch)
    full = _full
    found, done = [], set()
    for f in cands:
        if f.name in done or any(full(f, r) not in seen for r in ("up", "down", "gate") if getattr(f, r)):
            continue
        act = getattr(f.module, f.act)
        h = seen[full(f, "up")][2]
        h = act(seen[full(f, "gate")][2]) * h if f.gate else act(h)
        down_in, down_out = seen[full(f, "down")][1], seen[full(f, "down")][2]
        if h.shape != down_in.shape or not torch.allclose(h, down_in, rtol=1e-4, atol=1e-5):
            continue
        if f.standalone:
            f.standalone = f.name in seen and torch.equal(seen[f.name][2], down_out)
        found.append(f)
        done.add(f.name)
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


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) as the config states or implies them."""
    hidden = hidden_size(config)
    nh = int(getattr(config, "num_attention_heads", None) or config.n_head)
    nkv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or nh
    return nh, int(nkv), int(getattr(config, "head_dim", None) or hidden // nh)


def find_attentions(model: nn.Module) -> tuple[list[Attention], list[str]]:
    """Recognised attention modules, and names of modules that look like fused-QKV attention."""
    hidden = hidden_size(model.config)
    nh, nkv, hd = head_counts(model.config)
    rank = {n: i for i, n in enumerate(call_order(model))}
    fused_out = {(nh + 2 * nkv) * hd, (nh + 2) * hd, 3 * nh * hd}  # GQA, multi-query, plain MHA
    found, fused = [], []
    for name, mod in model.named_modules():
        lin = projections(mod)
        shapes = {n: (p.in_features, p.out_features) for n, p in lin.items()}
        if len(lin) == 2 and any((hidden, f) in shapes.values() for f in fused_out):
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
