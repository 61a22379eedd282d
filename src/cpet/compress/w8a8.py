"""``w8a8``: int8 weights *and* int8 activations, the arithmetic CPU int8 GEMM kernels run.

Weight-only quantization buys size but no speed on CPU prefill (the GEMMs stay float); int8
activations do (ORT ``MatMulInteger``, per-token graph: 0.27 ms vs 0.54 ms fp32 for one
64 x 576 x 1536 GEMM on this 2-core AMD EPYC, ``python -m cpet.export.int8bench gemm``). Three parts:

* **SmoothQuant** (Xiao et al. 2023): per input channel ``j`` of a group of linears that read
  one tensor, ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; the producer of that tensor
  divides channel ``j`` by ``s_j`` (a norm's weight and bias, or the rows of a gated FFN's up
  projection for the down projection) and the readers' weight columns are multiplied by it. The
  float function is unchanged; the activation outliers (up to ~4,500x the median channel in
  SmolLM2's ``down_proj`` inputs) move into the weights, where per-channel scales absorb them.
  Producers are found on a probe forward pass (the module whose output *is* the linears' input,
  and :func:`cpet.compress.arch.find_ffns` for gated FFNs); each is checked to scale its output
  exactly, otherwise that group stays unsmoothed. Attention outputs (``o_proj`` inputs) have no
  such producer and are not smoothed.
* **int8 weights**: symmetric, per output channel, round-to-nearest (the ``int8`` method's grid).
* **int8 activations, per token**: each row of a linear's input gets its own scale
  ``max|x| / 127`` at run time (:func:`quantize_tokens`). Per token, not per tensor: a prediction
  then never depends on what else is in the batch or on padding (a per-tensor dynamic scale over
  a padded batch does), and no calibrated scale can be broken by an outlier the calibration did
  not see. The price is six elementwise ops per quantized input: 0.27 ms against 0.22 ms for a
  static per-tensor ``QuantizeLinear`` in the GEMM above (the ops are shared by q/k/v and by
  gate/up, which read one input). ``activations: static`` (one calibrated absmax scale per layer
  input) is there to measure that trade: on SmolLM2 it raised perplexity 133 -> 182 (five
  down_proj layers kept float by the guard) for a 1-16% faster model (README "int8 activations").

A **guard** keeps a layer's activations float (its weights stay int8, weight-only) when int8
activations change its output on the calibration data by more than ``guard`` (relative L2
error); the manifest's step lists those layers.

Training form: each int8-activation layer carries a forward pre-hook (:class:`ActQuant`) that
replaces its input with the per-token quantized values, gradient straight through; LoRA and
recovery side paths, which read the input beside the base layer, stay float. So adapters are
trained *for* the arithmetic they are served with.
"""

from __future__ import annotations

import torch
from torch import nn

from cpet.compress import calib as calibration
from cpet.compress.arch import find_ffns, matrix, projection
from cpet.compress.config import W8A8Config
from cpet.compress.core import Calibration, CompressedModel, require_calib, require_targets
from cpet.compress.quant import quant_targets, rtn, store
from cpet.compress.registry import QUANTIZATION, Method, register

#: activation schemes: symmetric int8 per token (row of the last dimension), computed at run time;
#: or one calibrated scale per layer input (``static``), as ORT's ``QuantizeLinear`` applies it
PER_TOKEN, STATIC = "per-token", "static"
QMAX = 127.0
#: floor of a row's absmax, so an all-zero row gets a finite scale (and quantizes to zeros)
EPS = 1e-8


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values (as float, in -127..127) and the per-row scale ``[..., 1]`` of ``x``:
    ``x ~= q * scale``. The ONNX graph (:mod:`cpet.export.int8`) computes exactly these ops."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=EPS) / QMAX
    return torch.round(x / scale), scale


def quantize_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Integer values (as float) of ``x`` on one fixed scale: round half to even, saturated to
    -128..127, which is what ``QuantizeLinear`` with uint8 zero point 128 computes."""
    return torch.round(x / scale).clamp_(-128, 127)


def quantize(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x`` on its int8 grid, as values: per token (``scale`` None) or on a static scale."""
    if scale is None:
        q, s = quantize_tokens(x)
        return q * s
    return quantize_static(x, scale) * scale


class _FakeQuant(torch.autograd.Function):
    """Forward: the int8 values the kernel multiplies; backward: the gradient unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, scale):
        return quantize(x.detach(), scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x`` as the int8 kernel sees it (values), with a straight-through gradient."""
    return _FakeQuant.apply(x, scale)


class ActQuant:
    """Forward pre-hook of an int8-activation layer in training form: quantizes its input, per
    token (``scale`` None) or on the layer's calibrated static scale."""

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (fake_quant(args[0], self.scale), *args[1:])


def act_quantized(module: nn.Module) -> bool:
    return any(isinstance(h, ActQuant) for h in module._forward_pre_hooks.values())


def install(model: nn.Module, records: dict) -> int:
    """Give every record with int8 activations its :class:`ActQuant` hook (idempotent)."""
    n = 0
    for name, rec in records.items():
        if getattr(rec, "act", None) is None:
            continue
        mod = model.get_submodule(name)
        if not act_quantized(mod):
            mod.register_forward_pre_hook(ActQuant(rec.act_scale))
        n += 1
    return n


# --- SmoothQuant ----------------------------------------------------------------------------------


def _producers(model: nn.Module, linears: dict[str, nn.Module]) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """``(kind, producer, readers)`` groups: linears whose input is the output of a module with a
    per-channel ``weight`` vector (a norm: kind ``norm``), or a gated FFN's down projection (kind
    ``up``: the producer is the up projection, whose output rows scale the product ``act(gate) * up``);
    and the producers left alone because a projection outside ``linears`` reads them too (an
    excluded layer, the LM head): scaling them would change that layer's input."""
    every = {n: m for n, m in model.named_modules() if projection(m) is not None}
    width = {n: projection(m).in_features for n, m in linears.items()}
    norms = {n: m for n, m in model.named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
             and m.weight.numel() in set(width.values())}
    outs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive, so no id is reused
    ins: dict[str, torch.Tensor] = {}
    def output_of(name):
        def hook(_m, _args, out) -> None:  # returns None: a value would replace the output
            outs.setdefault(id(out), (name, out))
        return hook

    def input_of(name):
        def hook(_m, args) -> None:
            ins.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(output_of(n)) for n, m in norms.items()]
    hooks += [m.register_forward_pre_hook(input_of(n)) for n, m in every.items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[tuple[str, str], list[str]] = {}
    for name, x in ins.items():
        if id(x) in outs:
            groups.setdefault(("norm", outs[id(x)][0]), []).append(name)
    shared = sorted(prod for (_, prod), readers in groups.items() if any(r not in linears for r in readers))
    for ffn in find_ffns(model):
        down = f"{ffn.name}.{ffn.down}" if ffn.name else ffn.down
        if ffn.gate and down in linears:
            groups[("up", f"{ffn.name}.{ffn.up}" if ffn.name else ffn.up)] = [down]
    return [(kind, prod, readers) for (kind, prod), readers in groups.items() if prod not in shared], shared


@torch.no_grad()
def _scale_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide ``norm``'s output channels by ``s`` through its weight (and bias); False (and left as
    it was) when that does not scale its output exactly (e.g. a ``(1 + weight)`` norm)."""
    x = torch.randn(3, s.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight)
    before = norm(x)
    old = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None)) if isinstance(p, torch.Tensor)]
    for p, _ in old:
        p.div_(s.to(p))
    if not torch.allclose(norm(x) * s.to(x), before, rtol=1e-4, atol=1e-5):
        for p, v in old:
            p.copy_(v)
        return False
    return True


@torch.no_grad()
def smooth(model: nn.Module, calib: Calibration, linears: dict[str, nn.Module], alpha: float) -> dict:
    """SmoothQuant ``model`` in place for the ``linears`` (module docstring); returns what it did."""
    groups, shared = _producers(model, linears)
    probe = torch.arange(1, 9, device=next(model.parameters()).device).unsqueeze(0)
    before = model(input_ids=probe, use_cache=False).logits
    touched: list[tuple[torch.Tensor, torch.Tensor]] = []
    first = {readers[0]: linears[readers[0]] for _, _, readers in groups}
    amax: dict[str, torch.Tensor] = {}

    def record(name, x):
        a = x.abs().amax(0)
        amax[name] = torch.maximum(amax[name], a) if name in amax else a

    calibration.run(model, calib, first, record)
    done, skipped, ratio = [], list(shared), []
    for kind, producer, readers in groups:
        a = amax[readers[0]].clamp(min=1e-5)
        w = torch.stack([matrix(linears[r]).detach().abs().amax(0) for r in readers]).amax(0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        prod = model.get_submodule(producer)
        owned = [prod.weight, getattr(prod, "bias", None)] if kind == "norm" else [matrix(prod), projection(prod).bias]
        saved = [(t, t.detach().clone()) for t in owned + [matrix(linears[r]) for r in readers]
                 if isinstance(t, torch.Tensor)]
        if kind == "norm":
            ok = _scale_norm(prod, s)
        else:
            up = projection(prod)
            up.weight.div_(s.to(up.weight).unsqueeze(1))
            if up.bias is not None:
                up.bias.div_(s.to(up.bias))
            ok = True
        if not ok:
            skipped.append(producer)
            continue
        for r in readers:
            matrix(linears[r]).mul_(s.to(matrix(linears[r])))
        touched += saved
        done.append(producer)
        ratio.append(float(a.max() / a.median()))
    after = model(input_ids=probe, use_cache=False).logits
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * float(before.abs().max()) + 1e-5):
        for t, v in touched:  # something else reads a scaled tensor (e.g. a residual taken after the norm)
            t.copy_(v)
        skipped, done, ratio = skipped + done, [], []
    return {"smoothed_groups": len(done), "not_smoothable": skipped,
            "max_outlier_ratio_before": max(ratio) if ratio else None}


# --- the method -------------------------------------------------------------------------------------


@torch.no_grad()
def static_scales(model: nn.Module, calib: Calibration, linears: dict[str, nn.Module]) -> dict[str, float]:
    """Per linear: ``max |x| / 127`` of its input over the calibration tokens."""
    amax: dict[str, float] = {}

    def record(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))

    calibration.run(model, calib, linears, record)
    return {n: max(amax.get(n, 0.0), EPS) / QMAX for n in linears}


@torch.no_grad()
def guard_errors(model: nn.Module, calib: Calibration, linears: dict[str, nn.Module],
                 scales: dict[str, float] | None = None) -> dict[str, float]:
    """Per linear: relative L2 error of its output when its input is int8 (per token, or on
    ``scales[name]``), vs float input, with its current weights (so after int8 weight quantization)."""
    err = {n: 0.0 for n in linears}
    ref = {n: 0.0 for n in linears}

    def record(name, x):
        w = matrix(linears[name]).float()
        y = x @ w.T
        err[name] += float((quantize(x, (scales or {}).get(name)) @ w.T - y).pow(2).sum())
        ref[name] += float(y.pow(2).sum())

    calibration.run(model, calib, linears, record)
    return {n: (err[n] / ref[n]) ** 0.5 if ref[n] > 0 else 0.0 for n in linears}


def apply_w8a8(cm: CompressedModel, cfg: W8A8Config, calib: Calibration | None) -> dict:
    require_calib(cfg, "method", "w8a8", calib)
    targets = require_targets(cm, cfg, {n: t for n, t in quant_targets(cm.model, cfg).items() if t[1] == "linear"})
    linears = {n: mod for n, (mod, _) in targets.items()}
    smoothing = smooth(cm.model, calib, linears, cfg.alpha) if cfg.alpha > 0 else {"smoothed_groups": 0}
    for name, mod in linears.items():
        store(cm, name, mod, "linear", rtn(matrix(mod), 8, matrix(mod).shape[1]))
    scales = static_scales(cm.model, calib, linears) if cfg.activations == STATIC else None
    errors = guard_errors(cm.model, calib, linears, scales)
    kept_float = sorted(n for n, e in errors.items() if e > cfg.guard)
    for name in linears:
        rec = cm.records[name]
        rec.act = None if name in kept_float else cfg.activations
        rec.act_scale = scales[name] if rec.act == STATIC else None
    install(cm.model, cm.records)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    return {"bits": 8, "granularity": "per-output-channel", "activations": cfg.activations, "alpha": cfg.alpha,
            "guard": cfg.guard, "quantized": len(linears), "int8_activations": len(linears) - len(kept_float),
            "float_activations": kept_float, "largest_errors": {n: round(e, 4) for n, e in worst},
            **smoothing}


register(Method("w8a8", W8A8Config, apply_w8a8, QUANTIZATION,
                "SmoothQuant int8 weights and int8 activations, per token or static (int8 GEMMs on CPU)"))
