"""Weight-only quantization methods: ``int8``, ``int4`` / ``int3`` (RTN or GPTQ) and ``nf4``.

Only weights are quantized; activations stay float, because that is what a weight-only
kernel computes and what LoRA/recovery training must see (ORT's dynamic per-tensor activation
quantization breaks the default model; ``w8a8`` in :mod:`cpet.compress.w8a8` does int8 activations
with SmoothQuant, per-token scales and training for them). Each quantized weight becomes a
:class:`~cpet.compress.core.QuantRecord`, and the training-form layer holds exactly
``record.dequantize()``. Embeddings and the output head are optional and always RTN.
"""

from __future__ import annotations

import torch
from torch import nn

from cpet.compress import calib as calibration
from cpet.compress import qmath
from cpet.compress.arch import excluded, linear_layers, matrix, projection
from cpet.compress.config import Int8Config, IntNConfig, Nf4Config
from cpet.compress.core import (
    Calibration,
    CompressedModel,
    QuantRecord,
    WeightRecord,
    require_calib,
    require_targets,
    set_weight,
)
from cpet.compress.gptq import gptq
from cpet.compress.registry import QUANTIZATION, Method, register
from cpet.errors import CpetError


def quant_targets(model: nn.Module, cfg) -> dict[str, tuple[nn.Module, str]]:
    """Modules whose weights get quantized: ``name -> (module, kind)``, each weight once."""
    out: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    if cfg.embeddings:
        emb = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is emb)
        if not excluded(name, cfg.exclude):
            out[name] = (emb, "embedding")
            seen.add(id(emb.weight))
    for name, mod in linear_layers(model, cfg.exclude, include_head=cfg.embeddings).items():
        if id(mod.weight) not in seen:
            out[name] = (mod, "linear")
    return out


def store(cm: CompressedModel, name: str, module: nn.Module, kind: str, quant: QuantRecord) -> None:
    """Record ``quant`` for ``name`` (masked weights forced to the exact-zero level) and write the weights."""
    rec = cm.records.setdefault(name, WeightRecord(kind))
    if rec.mask is not None:
        quant.levels[~rec.mask] = qmath.zero_level(quant.bits, quant.codebook)
    rec.quant = quant
    set_weight(module, quant.dequantize())


def rtn(weight: torch.Tensor, bits: int, group_size: int, codebook: str | None = None) -> QuantRecord:
    """Round-to-nearest with absmax scales per group."""
    scales = qmath.group_scales(weight, bits, group_size, codebook)
    return QuantRecord(bits, group_size, qmath.quantize(weight, scales, bits, codebook), scales, codebook)


def _check_groups(targets, cfg, field: str, size: int) -> None:
    for name, (mod, _) in targets.items():
        cols = matrix(mod).shape[1]
        if cols % size:
            raise cfg.error(
                field, f"must divide the input width of every quantized layer; {size} does not divide {cols} ({name})"
            )


def apply_int8(cm: CompressedModel, cfg: Int8Config, calib: Calibration | None) -> dict:
    targets = require_targets(cm, cfg, quant_targets(cm.model, cfg))
    for name, (mod, kind) in targets.items():
        store(cm, name, mod, kind, rtn(matrix(mod), 8, matrix(mod).shape[1]))
    return {"bits": 8, "granularity": "per-output-channel", "quantized": len(targets)}


def apply_intn(cm: CompressedModel, cfg: IntNConfig, calib: Calibration | None) -> dict:
    algorithm = cfg.algorithm if cfg.algorithm != "auto" else ("gptq" if calib is not None else "rtn")
    if algorithm == "gptq":
        require_calib(cfg, "algorithm", "gptq", calib)
    targets = require_targets(cm, cfg, quant_targets(cm.model, cfg))
    _check_groups(targets, cfg, "group_size", cfg.group_size)
    head = cm.model.get_output_embeddings()
    rtn_only = {n: t for n, t in targets.items() if algorithm == "rtn" or t[1] == "embedding" or t[0] is head}
    for name, (mod, kind) in rtn_only.items():
        store(cm, name, mod, kind, rtn(matrix(mod), cfg.bits, cfg.group_size))
    linears = {n: t[0] for n, t in targets.items() if n not in rtn_only}
    if linears:

        def add(state, x):
            state[0].addmm_(x.T, x)
            state[1] += x.shape[0]

        def process(name, mod, state):
            hessian = state[0] / max(state[1], 1)
            mask = cm.records[name].mask if name in cm.records else None
            levels, scales = gptq(matrix(mod), hessian, cfg.bits, cfg.group_size, cfg.damp, cfg.block_size, mask)
            store(cm, name, mod, "linear", QuantRecord(cfg.bits, cfg.group_size, levels, scales))

        def new(m):
            n = projection(m).in_features
            return [torch.zeros(n, n, device=m.weight.device), 0]

        calibration.sequential_stats(cm.model, calib, linears, new, add, process)
    return {"bits": cfg.bits, "group_size": cfg.group_size, "algorithm": algorithm, "quantized": len(targets)}


def apply_nf4(cm: CompressedModel, cfg: Nf4Config, calib: Calibration | None) -> dict:
    if not torch.cuda.is_available():
        raise CpetError(
            f"{cfg.key('method')}: nf4 is bitsandbytes 4-bit NF4 and needs a CUDA GPU; this host has none "
            "(torch.cuda.is_available() is False). It is refused rather than replaced: use 'int4' on CPU."
        )
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise CpetError(f"{cfg.key('method')}: nf4 needs bitsandbytes (pip install 'cpet[gpu]'): {exc}") from None
    table = bnbf.get_4bit_type("nf4", device="cuda").float().cpu()
    if not torch.allclose(table, torch.tensor(qmath.NF4), atol=1e-6):
        raise CpetError("nf4: this bitsandbytes build uses a different NF4 table than cpet expects")
    targets = require_targets(cm, cfg, quant_targets(cm.model, cfg))
    _check_groups(targets, cfg, "block_size", cfg.block_size)
    for name, (mod, kind) in targets.items():
        w = matrix(mod).detach().to("cuda", torch.float32).contiguous()
        packed, state = bnbf.quantize_4bit(w, blocksize=cfg.block_size, quant_type="nf4")
        ref = bnbf.dequantize_4bit(packed, state).float()
        scales = state.absmax.float().reshape(w.shape[0], -1)
        levels = qmath.quantize(ref, scales, 4, "nf4")  # bnb's codes, read back from its dequantized weights
        rec = QuantRecord(4, cfg.block_size, levels.to(matrix(mod).device), scales.to(matrix(mod).device), "nf4")
        if not torch.allclose(rec.dequantize().to("cuda"), ref, atol=1e-5, rtol=1e-5):
            raise CpetError(f"nf4: could not reproduce bitsandbytes' dequantized weights of {name}")
        store(cm, name, mod, kind, rec)
    return {"bits": 4, "block_size": cfg.block_size, "codebook": "nf4", "backend": "bitsandbytes"}


register(Method("int8", Int8Config, apply_int8, QUANTIZATION, "per-output-channel symmetric int8 weights"))
register(Method("int4", IntNConfig, apply_intn, QUANTIZATION, "group-wise 4-bit weights, RTN or GPTQ"))
register(Method("int3", IntNConfig, apply_intn, QUANTIZATION, "group-wise 3-bit weights, RTN or GPTQ"))
register(Method("nf4", Nf4Config, apply_nf4, QUANTIZATION, "bitsandbytes NF4 (CUDA only)"))
