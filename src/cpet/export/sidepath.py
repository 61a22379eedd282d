"""The deployment form of a task bundle: base weights on their own grid + low-rank side paths.

Why not "merge LoRA, then quantize": ``W_q + B A`` is off the quantization grid, and
re-quantizing rounds most of the (small) task delta away (``plain_model(..., requantize=True)``
builds that form so the export report can measure the loss). What is exact instead:

* a **float** base layer (original, pruned, structured): every *linear* low-rank term (LoRA,
  identity recovery) folds into the weight, ``W + sum_i s_i B_i A_i`` (float rounding only);
* a **quantized** base layer keeps its packed weight; all its linear low-rank terms become ONE side
  path ``[s_1 B_1 | s_2 B_2] [A_1; A_2] x`` (a sum of products is the product of stacked factors);
* a **GELU** recovery module is not linear: always its own side path ``s B gelu(A x)``.

Side paths cost little in GEMM count: the A factors of all paths that read one input (q/k/v,
gate/up) are stacked into one GEMM and each layer's paths share one B GEMM (:func:`share_inputs`;
``[B_1 | B_2] [act_1(A_1 x); act_2(A_2 x)]`` is the same sum).

``deploy_model(bundle, records, backend)`` builds that form as a plain HF model: ``backend="torch"``
runs quantized layers from packed storage (:class:`cpet.compress.QuantLinear`), ``"onnx"`` traces
them as ``MatMulNBits`` (:class:`cpet.export.nbits.NBitsLinear`), or, with int8 activations (w8a8),
as ``MatMulInteger`` (:class:`cpet.export.int8.Int8Linear`). ``cpet.serve.MultiTaskModel``
reuses :func:`layer_terms`, :func:`side_terms` and :class:`SidePath` to give one base a switchable
side path per task.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from cpet.compress.arch import projection
from cpet.compress.core import WeightRecord
from cpet.errors import CpetError
from cpet.pet.recovery import RecoveryLayer


@dataclass
class LowRank:
    """``B act(A x)``; ``B`` already carries the scaling."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    act: str  # "identity" | "gelu"


def _terms(layer: BaseTunerLayer) -> list[LowRank]:
    """The low-rank terms one peft layer adds for its active adapters (merged ones are refused)."""
    if layer.merged:
        raise CpetError("export: adapters are already merged into the base weights; load the bundle unmerged")
    out = []
    for name in layer.active_adapters:
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            if name in layer.lora_magnitude_vector or layer.lora_bias.get(name):
                raise CpetError(f"export: adapter {name!r} uses DoRA or a LoRA bias, which has no side-path form")
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            out.append(LowRank(a.detach().float(), b.detach().float() * layer.scaling[name], "identity"))
        elif isinstance(layer, RecoveryLayer) and name in layer.rec_A:
            a, b = layer.rec_A[name].weight, layer.rec_B[name].weight
            act = "identity" if layer.mergeable(name) else "gelu"
            out.append(LowRank(a.detach().float(), b.detach().float() * layer.scaling[name], act))
    return out


def layer_terms(model: nn.Module) -> dict[str, tuple[nn.Module, list[LowRank]]]:
    """Per module path of the plain base model: its base projection (``nn.Linear``, ``Conv1D``) and
    every low-rank term on it."""
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    out: dict[str, tuple[nn.Linear, list[LowRank]]] = {}
    for name, mod in plain.named_modules():
        if not isinstance(mod, BaseTunerLayer) or any(name.startswith(p + ".") for p in out):
            continue
        terms, inner = [], mod
        while isinstance(inner, BaseTunerLayer):
            terms += _terms(inner)
            inner = inner.base_layer
        if projection(inner) is None:
            raise CpetError(f"export: {name} wraps a {type(inner).__name__}, only nn.Linear / Conv1D are supported")
        out[name] = (inner, terms)
    return out


def stack(terms: list[LowRank]) -> LowRank | None:
    """Linear terms as one: ``sum_i B_i A_i = [B_1 | B_2 ...] [A_1; A_2 ...]``."""
    lin = [t for t in terms if t.act == "identity"]
    if not lin:
        return None
    return LowRank(torch.cat([t.A for t in lin]), torch.cat([t.B for t in lin], dim=1), "identity")


def side_terms(terms: list[LowRank]) -> list[LowRank]:
    """The side paths of a layer whose weight stays as it is: its linear terms stacked into one,
    then each nonlinear (GELU) term."""
    lin = stack(terms)
    return ([lin] if lin is not None else []) + [t for t in terms if t.act != "identity"]


def fold(weight: torch.Tensor, terms: list[LowRank]) -> torch.Tensor:
    """``W + sum B A`` over the linear terms, in float32 (``weight`` as ``[out, in]``)."""
    w = weight.detach().float().clone()
    for t in terms:
        if t.act == "identity":
            w += t.B @ t.A
    return w


class SidePath(nn.Module):
    """``B act(A x)`` as two bias-free linears (one MatMul each in ONNX)."""

    def __init__(self, term: LowRank, dtype: torch.dtype) -> None:
        super().__init__()
        r, d_in = term.A.shape
        self.A = nn.Linear(d_in, r, bias=False, dtype=dtype)
        self.B = nn.Linear(r, term.B.shape[0], bias=False, dtype=dtype)
        self.act = nn.GELU() if term.act == "gelu" else nn.Identity()
        with torch.no_grad():
            self.A.weight.copy_(term.A)
            self.B.weight.copy_(term.B)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.act(self.A(x)))


class SideLinear(nn.Module):
    """``base(x) + sum side(x)``; ``base`` is a float, packed or MatMulNBits linear."""

    def __init__(self, base: nn.Module, sides: list[SidePath]) -> None:
        super().__init__()
        self.base = base
        self.sides = nn.ModuleList(sides)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for side in self.sides:
            y = y + side(x)
        return y


class SharedA(nn.Module):
    """The A factors of every side path that reads one input tensor, stacked: one GEMM per input
    instead of one per path (q/k/v read the same normed hidden state, so do gate/up).

    Each of its ``readers`` layers calls it with its input; the product is computed for the first
    and handed to the others while they pass the very same tensor object (any other tensor is
    multiplied afresh: exact either way), then dropped, so no activation outlives the forward pass.
    Input and product are cached as one tuple, read once per call: threads sharing the model can
    only cost a recomputation, never hand one call another's product.
    """

    def __init__(self, A: torch.Tensor, readers: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.A = nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=dtype)
        with torch.no_grad():
            self.A.weight.copy_(A)
        self.requires_grad_(False)
        self.readers = readers
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, A @ input)
        self._left = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        if cache is not None and cache[0] is x:
            y = cache[1]
            self._left -= 1
            if self._left <= 0:
                self._cache = None
        else:
            y = self.A(x)
            self._cache, self._left = ((x, y), self.readers - 1) if self.readers > 1 else (None, 0)
        return y


class SharedSides(nn.Module):
    """Every side path of one layer from a :class:`SharedA`: ``u = (A x)[start : start + sum r]``,
    then ``[B_1 | B_2 ...] [act_1(u_1); act_2(u_2) ...]``, one B GEMM for all of the layer's paths.

    Only the group's first layer (``owner``) registers the shared A as a submodule; the others
    hold a plain reference, so its weight has one name (state dict, ONNX initializer)."""

    def __init__(self, shared: SharedA, start: int, terms: list[LowRank], dtype: torch.dtype,
                 owner: bool = True) -> None:
        super().__init__()
        if owner:
            self.shared = shared
        else:
            object.__setattr__(self, "shared", shared)
        self.start = start
        self.ranks = [t.A.shape[0] for t in terms]
        self.acts = nn.ModuleList(nn.GELU() if t.act == "gelu" else nn.Identity() for t in terms)
        self.B = nn.Linear(sum(self.ranks), terms[0].B.shape[0], bias=False, dtype=dtype)
        with torch.no_grad():
            self.B.weight.copy_(torch.cat([t.B for t in terms], dim=1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.shared(x).narrow(-1, self.start, sum(self.ranks))
        if not all(isinstance(a, nn.Identity) for a in self.acts):
            u = torch.cat([act(part) for act, part in zip(self.acts, u.split(self.ranks, dim=-1))], dim=-1)
        return self.B(u)


def _side_term(side: SidePath) -> LowRank:
    return LowRank(side.A.weight.detach().float(), side.B.weight.detach().float(),
                   "gelu" if isinstance(side.act, nn.GELU) else "identity")


@torch.no_grad()
def share_inputs(model: nn.Module) -> nn.Module:
    """Regroup ``model``'s side paths (in place) so that layers reading the same input tensor share
    one stacked A GEMM (:class:`SharedA`) and each layer has one B GEMM (:class:`SharedSides`).

    Which layers share an input is found by running ``model`` once on a 4-token probe and comparing
    the tensor objects each :class:`SideLinear` receives: no per-architecture table, and a layer
    whose input differs simply gets a group of its own.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SideLinear) and len(m.sides)}
    if not layers:
        return model
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, args[0]))
             for n, m in layers.items()]
    try:
        vocab = model.get_input_embeddings().num_embeddings
        ids = (torch.arange(4) % vocab).unsqueeze(0).to(model.device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    for name in layers:
        if name not in seen:
            continue
        group = next((g for g in groups if seen[g[0]] is seen[name]), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    seen.clear()
    dtype = next(model.parameters()).dtype
    for group in groups:
        terms = {n: [_side_term(s) for s in layers[n].sides] for n in group}
        shared = SharedA(torch.cat([t.A for n in group for t in terms[n]]), len(group), dtype)
        start = 0
        for i, n in enumerate(group):
            layers[n].sides = nn.ModuleList([SharedSides(shared, start, terms[n], dtype, owner=i == 0)])
            start += sum(t.A.shape[0] for t in terms[n])
    return model


def _float_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing ``base`` (a Linear or Conv1D) with ``weight`` ``[out, in]``."""
    p = projection(base)
    if isinstance(base, nn.Linear):
        new = copy.deepcopy(base)
    else:
        new = nn.Linear(p.in_features, p.out_features, bias=p.bias is not None, dtype=p.weight.dtype,
                        device=p.weight.device)
        if p.bias is not None:
            new.bias = nn.Parameter(p.bias.detach().clone(), requires_grad=False)
    with torch.no_grad():
        new.weight = nn.Parameter(weight.to(p.weight.dtype), requires_grad=False)
    return new


def _quantized(records: dict[str, WeightRecord] | None) -> dict[str, WeightRecord]:
    """Records of quantized linear weights (the ones kept packed); embeddings deploy as float."""
    return {n: r for n, r in (records or {}).items() if r.quant is not None and r.kind == "linear"}


def plain_model(model: nn.Module, records: dict[str, WeightRecord] | None,
                requantize: bool = False) -> tuple[nn.Module, dict[str, WeightRecord]]:
    """A copy of the bundle as a plain HF model with :class:`SideLinear` layers (float weights still),
    and the quantized records renamed to where their weights now live.

    ``requantize=True`` builds the naive form instead: linear terms folded into quantized weights too,
    then rounded back onto the record's grid (bits, group size) with round-to-nearest.
    """
    terms = layer_terms(model)
    quant = _quantized(records)
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    dtype = next(plain.parameters()).dtype
    work = copy.deepcopy(plain)
    renamed = dict(quant)
    for name, (base, ts) in terms.items():
        rec = quant.get(name)
        sides = [t for t in ts if t.act != "identity"]
        if rec is None:
            new_base = _float_linear(base, fold(projection(base).weight, ts))
        elif requantize:
            from cpet.compress.quant import rtn

            q = rtn(fold(projection(base).weight, ts), rec.quant.bits, rec.quant.group_size)
            new_base = _float_linear(base, q.dequantize())
            renamed[name] = WeightRecord("linear", q)
        else:
            new_base = _float_linear(base, projection(base).weight)
            sides = side_terms(ts)
        module = SideLinear(new_base, [SidePath(t, dtype) for t in sides]) if sides else new_base
        work.set_submodule(name, module)
        if sides and name in renamed:
            renamed[f"{name}.base"] = renamed.pop(name)
    if hasattr(work, "_cpet_recovery_config"):
        del work._cpet_recovery_config
    if hasattr(work, "peft_config"):
        del work.peft_config
    return work.eval(), renamed


def deploy_model(model: nn.Module, records: dict[str, WeightRecord] | None = None,
                 backend: str = "torch", requantize: bool = False, share: bool = True) -> nn.Module:
    """The bundle's deployment form (see the module docstring); ``model`` is a bundle, a bare
    compressed model or an original model with its adapter. ``records`` are the compressed base's.
    ``share``: side paths reading one input share an A GEMM (:func:`share_inputs`)."""
    work, renamed = plain_model(model, records, requantize)
    if share:
        share_inputs(work)
    if backend == "torch":
        from cpet.compress.runtime import to_deploy

        return to_deploy(work, renamed) if renamed else work.requires_grad_(False)
    if backend != "onnx":
        raise CpetError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    from cpet.export.int8 import Int8Linear
    from cpet.export.nbits import NBitsLinear

    for name, rec in renamed.items():
        mod = work.get_submodule(name)
        work.set_submodule(name, Int8Linear(mod, rec.quant, rec.act_scale) if rec.act else NBitsLinear(mod, rec.quant))
    return work.requires_grad_(False)
