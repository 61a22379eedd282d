"""MoEfication (Zhang et al. 2022): split each FFN's neurons into experts, route top-k per token.

* Experts: balanced k-means of the neurons' (normalised) input-weight rows, gate and up rows
  concatenated for gated FFNs, into ``num_experts`` equal groups. Expert ``e`` holds the slices
  ``gate/up[idx_e, :]`` and ``down[:, idx_e]`` of the original weights as ordinary
  ``nn.Linear`` modules named like the originals (so a LoRA ``target_modules`` entry such as
  ``up_proj`` still matches; the project's default LoRA targets attention and is unaffected).
* Router: ``fitted`` = ridge regression, on calibration tokens, from the FFN input to each
  expert's output norm ``||down_e(act(gate_e x) * up_e x)||``; ``centroid`` = similarity of
  the input to the mean normalised gate (or up) row of each expert (no data needed).
* Placement: a standalone FFN module (an ``.mlp``) is replaced whole; a plain FFN whose roles sit
  on a larger module (OPT's decoder layer, BLOOM's MLP that also adds the residual) keeps its place:
  the MoE module takes the ``down`` slot, ``up`` and the activation become ``nn.Identity``.
* Forward: the selected experts' outputs are summed without weights, computing only those
  experts for only the tokens that chose them, so ``top_k == num_experts`` is the dense FFN.

``MoEFFN`` counts tokens and computed neurons; :func:`moe_stats` reports the fraction of FFN
neuron work actually skipped (``1 - k / E`` for equal experts) and the router's extra cost.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cpet.compress import calib as calibration
from cpet.compress.arch import FFN, find_ffns, parent_of
from cpet.compress.config import MoEConfig
from cpet.compress.core import Calibration, CompressedModel, freeze, refuse, require_calib
from cpet.compress.registry import MOE, Method, register
from cpet.errors import CpetError


class Router(nn.Module):
    """Linear expert scores ``x @ weight.T + bias`` (not an nn.Linear: never quantized or pruned)."""

    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class Expert(nn.Module):
    """A slice of the FFN neurons; child Linears keep the original role names."""

    def __init__(self, roles: dict[str, str], hidden: int, size: int, in_bias: bool) -> None:
        super().__init__()
        self.roles = roles
        for role in ("gate", "up"):
            if roles.get(role):
                self.add_module(roles[role], nn.Linear(hidden, size, bias=in_bias))
        self.add_module(roles["down"], nn.Linear(size, hidden, bias=False))

    def forward(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        r = self.roles
        h = getattr(self, r["up"])(x)
        h = act(getattr(self, r["gate"])(x)) * h if r.get("gate") else act(h)
        return getattr(self, r["down"])(h)


class MoEFFN(nn.Module):
    """Drop-in replacement of an FFN module computing only the top-k experts per token."""

    def __init__(self, roles: dict, hidden: int, width: int, num_experts: int, top_k: int, act: nn.Module,
                 in_bias: bool, down_bias: bool) -> None:  # fmt: skip
        super().__init__()
        size = width // num_experts
        self.top_k, self.width = top_k, width
        self.act = act
        self.router = Router(hidden, num_experts)
        self.experts = nn.ModuleList(Expert(roles, hidden, size, in_bias) for _ in range(num_experts))
        self.register_buffer("neuron_index", torch.zeros(num_experts, size, dtype=torch.long))
        self.down_bias = nn.Parameter(torch.zeros(hidden)) if down_bias else None
        self.observer = None  # calibration callback(x, per-expert output norms)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.tokens = 0
        self.neurons = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        n, num = h.shape[0], len(self.experts)
        k = num if self.observer is not None else self.top_k  # calibration runs the dense FFN
        if k == num:
            chosen = torch.ones(n, num, dtype=torch.bool, device=h.device)
        else:
            top = self.router(h).topk(k, dim=-1).indices
            chosen = torch.zeros(n, num, dtype=torch.bool, device=h.device).scatter_(1, top, True)
        out = torch.zeros_like(h)
        norms = [] if self.observer is not None else None
        for e, expert in enumerate(self.experts):
            rows = chosen[:, e].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if rows.numel() == n:
                y = expert(h, self.act)
                out += y
            else:
                y = expert(h.index_select(0, rows), self.act)
                out.index_add_(0, rows, y)
            if norms is not None:
                norms.append(y.float().norm(dim=-1))
        if self.down_bias is not None:
            out += self.down_bias.to(out.dtype)
        self.tokens += n
        self.neurons += int(chosen.sum()) * self.neuron_index.shape[1]
        if norms is not None:
            self.observer(x, torch.stack(norms, dim=1))
        return out.view(shape)

    @classmethod
    def from_ffn(cls, ffn: FFN, groups: list[torch.Tensor], top_k: int, hidden: int) -> MoEFFN:
        """Experts holding the given neuron groups of ``ffn`` (weights copied)."""
        roles = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}
        up, down = ffn.proj("up"), ffn.proj("down")
        moe = cls(roles, hidden, ffn.width, len(groups), top_k, getattr(ffn.module, ffn.act),
                  up.bias is not None, down.bias is not None)  # fmt: skip
        moe.to(device=down.weight.device, dtype=down.weight.dtype)
        with torch.no_grad():
            for e, idx in enumerate(groups):
                moe.neuron_index[e] = idx
                ex = moe.experts[e]
                for role in ("gate", "up"):
                    if roles[role]:
                        src, dst = ffn.proj(role), getattr(ex, roles[role])
                        dst.weight.copy_(src.weight[idx])
                        if src.bias is not None:
                            dst.bias.copy_(src.bias[idx])
                getattr(ex, roles["down"]).weight.copy_(down.weight[:, idx])
            if down.bias is not None:
                moe.down_bias.copy_(down.bias)
            rows = ffn.proj("gate" if ffn.gate else "up").weight.detach().float()
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            moe.router.weight.copy_(torch.stack([rows[idx].mean(0) for idx in groups]))
        return moe


def balanced_kmeans(feats: torch.Tensor, k: int, iters: int, seed: int) -> list[torch.Tensor]:
    """Split rows of ``feats`` into ``k`` equal clusters (cosine k-means, greedy capacity assignment)."""
    x = torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy()
    n, size = x.shape[0], x.shape[0] // k
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(n, k, replace=False)]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = x @ cent.T
        cap = np.full(k, size)
        for j in np.argsort(-sim.max(1), kind="stable"):
            s = np.where(cap > 0, sim[j], -np.inf)
            assign[j] = int(s.argmax())
            cap[assign[j]] -= 1
        new = np.stack([x[assign == e].mean(0) for e in range(k)])
        cent = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
    return [torch.from_numpy(np.flatnonzero(assign == e)) for e in range(k)]


def _fit_routers(model: nn.Module, moes: list[MoEFFN], calib: Calibration, ridge: float) -> None:
    """Ridge regression of each expert's output norm on the FFN input (plus a bias)."""
    tokens = calibration.TokenFilter()
    sums: dict[int, list[torch.Tensor]] = {}

    def observer_for(i):
        def observe(x, norms):
            rows = tokens.rows(x)  # real tokens only
            y = norms[tokens.mask] if tokens.mask is not None and tokens.mask.numel() == norms.shape[0] else norms
            x1 = torch.cat([rows, torch.ones(rows.shape[0], 1, device=rows.device)], 1)
            a, b = x1.T @ x1, x1.T @ y.float()
            sums[i] = [sums[i][0] + a, sums[i][1] + b] if i in sums else [a, b]

        return observe

    for i, m in enumerate(moes):
        m.observer = observer_for(i)
    try:
        calibration.run_with_tokens(model, calib, tokens)
    finally:
        for m in moes:
            m.observer = None
    for i, m in enumerate(moes):
        a, b = sums[i]
        hidden = a.shape[0] - 1
        lam = ridge * torch.diagonal(a)[:hidden].mean()
        reg = torch.diag(torch.cat([torch.full((hidden,), float(lam)), torch.zeros(1)])).to(a.device)
        sol = torch.linalg.solve(a + reg + 1e-6 * torch.eye(hidden + 1, device=a.device), b)  # [hidden+1, E]
        with torch.no_grad():
            m.router.weight.copy_(sol[:hidden].T)
            m.router.bias.copy_(sol[hidden])


def moe_modules(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def moe_stats(model: nn.Module) -> dict:
    """Measured fraction of FFN neuron work skipped since the counters were last reset."""
    moes = moe_modules(model)
    dense = sum(m.tokens * m.width for m in moes)
    done = sum(m.neurons for m in moes)
    router = sum(m.router.weight.numel() for m in moes)
    ffn = sum(sum(p.numel() for p in m.experts.parameters()) for m in moes)
    return {
        "skipped_ffn_fraction": (1 - done / dense) if dense else None,
        "tokens": moes[0].tokens if moes else 0,
        "router_cost_fraction": router / ffn if ffn else 0.0,
    }


def apply_moe(cm: CompressedModel, cfg: MoEConfig, calib: Calibration | None) -> dict:
    if cfg.router == "fitted":
        require_calib(cfg, "router", "fitted", calib)
    if cm.records:
        raise CpetError(f"{cfg.key('method')}: moe must come before quantization and masks")
    model = cm.model
    hidden = model.get_input_embeddings().weight.shape[1]
    ffns = find_ffns(model)
    if not ffns:
        raise refuse(cm, cfg, "no FFN (up -> activation -> down projections) recognised")
    if any(f.gate and not f.standalone for f in ffns):
        raise refuse(cm, cfg, "a gated FFN that is not a module of its own cannot be replaced by experts")
    layers, moes = {}, []
    for ffn in ffns:
        if ffn.width % cfg.num_experts:
            raise cfg.error("num_experts", f"must divide the FFN width {ffn.width} ({ffn.name})")
        rows = [ffn.proj(r).weight.detach().float() for r in ("gate", "up") if getattr(ffn, r)]
        feats = torch.cat([torch.nn.functional.normalize(r, dim=1) for r in rows], 1)
        groups = balanced_kmeans(feats, cfg.num_experts, cfg.kmeans_iters, cfg.seed)
        moe = MoEFFN.from_ffn(ffn, groups, cfg.top_k, hidden)
        slot = "module" if ffn.standalone else "down"
        layers[ffn.name] = {"roles": moe.experts[0].roles, "act": ffn.act, "width": ffn.width, "slot": slot,
                            "in_bias": ffn.proj("up").bias is not None,
                            "down_bias": ffn.proj("down").bias is not None}  # fmt: skip
        place(model, ffn.name, moe, ffn.act, moe.experts[0].roles, slot)
        moes.append(moe)
    if cfg.router == "fitted":
        _fit_routers(model, moes, calib, cfg.ridge)
    freeze(model)
    info = {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "router": cfg.router, "layers": layers}
    if calib is not None:
        for m in moes:
            m.reset_counts()
        calibration.run_with_tokens(model, calib, calibration.TokenFilter())
        info["measured_on_calibration"] = moe_stats(model)
        for m in moes:
            m.reset_counts()
    info["expected_skipped_ffn_fraction"] = 1 - cfg.top_k / cfg.num_experts
    cm.info["moe"] = info
    return {k: v for k, v in info.items() if k != "layers"}


def _place_module(model: nn.Module, name: str, moe: MoEFFN, act: str, roles: dict) -> None:
    parent, child = parent_of(model, name)
    setattr(parent, child, moe)


def _place_down(model: nn.Module, name: str, moe: MoEFFN, act: str, roles: dict) -> None:
    owner = model.get_submodule(name)
    setattr(owner, roles["down"], moe)  # x -> up -> act -> down becomes x -> id -> id -> moe(x)
    setattr(owner, roles["up"], nn.Identity())
    setattr(owner, act, nn.Identity())


#: where a MoEFFN goes: instead of the FFN module, or into the down slot of the module holding the roles
PLACEMENTS = {"module": _place_module, "down": _place_down}


def place(model: nn.Module, name: str, moe: MoEFFN, act: str, roles: dict, slot: str) -> None:
    PLACEMENTS[slot](model, name, moe, act, roles)


def install_skeleton(model: nn.Module, info: dict) -> None:
    """Replace the FFNs named in a manifest's ``moe`` section by empty MoEFFNs (before loading weights)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    dtype = next(model.parameters()).dtype
    for name, layer in info["layers"].items():
        act = getattr(model.get_submodule(name), layer["act"])
        moe = MoEFFN(layer["roles"], hidden, layer["width"], info["num_experts"], info["top_k"], act,
                     layer["in_bias"], layer["down_bias"]).to(dtype)  # fmt: skip
        place(model, name, moe, layer["act"], layer["roles"], layer.get("slot", "module"))


register(Method("moe", MoEConfig, apply_moe, MOE, "MoEfication: top-k experts per token"))
