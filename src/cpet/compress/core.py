"""The compressed-model object and the ``compress`` entry point.

Two forms of one compressed model:

* **training form** (``CompressedModel.model``): an ordinary float HF model that peft can wrap.
  Quantized layers hold exactly the dequantized weights the deployment kernels compute with
  (weight-only: activations stay float, except that a ``w8a8`` layer's forward pre-hook rounds its
  input to int8 per token, :mod:`cpet.compress.w8a8`); pruned layers hold zeros at masked positions. All
  base parameters are frozen (LoRA trains only its own tensors); :meth:`CompressedModel.verify`
  checks that masks and quantization grids are still intact, e.g. after a training step.
* **deployment form** (:meth:`CompressedModel.deploy_model`, or ``load_compressed(form="deploy")``):
  the same computation from packed integer weights (:mod:`cpet.compress.runtime`); on disk
  weights are packed levels + scales and sparse matrices are bitmask + values.

How each weight is stored in the deployment form is a :class:`WeightRecord` keyed by the name
of the module owning it; structural changes (shrunken matrices, MoE modules) live in the model
itself and are described in the manifest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from cpet.compress import qmath
from cpet.compress.arch import matrix
from cpet.compress.config import MethodConfig
from cpet.compress.registry import METHODS, parse_config
from cpet.errors import ConfigError, CpetError, Unsupported

#: calibration batches: dicts with ``input_ids`` and optionally ``attention_mask`` tensors
Calibration = list[dict[str, torch.Tensor]]


@dataclass
class QuantRecord:
    """Levels (uint8, one per weight) and float32 scales of one quantized matrix."""

    bits: int
    group_size: int
    levels: torch.Tensor
    scales: torch.Tensor
    codebook: str | None = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return qmath.dequantize(self.levels, self.scales, self.bits, self.codebook, dtype)

    def meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "codebook": self.codebook}


@dataclass
class WeightRecord:
    """How one weight matrix (of a Linear, or an Embedding) is stored in the deployment form."""

    kind: Literal["linear", "embedding"]
    quant: QuantRecord | None = None
    mask: torch.Tensor | None = None  # bool, False = pruned: always exactly zero
    act: str | None = None  # "per-token" | "static": int8 activations too (cpet.compress.w8a8); None: float
    act_scale: float | None = None  # the calibrated input scale of a "static" layer

    def meta(self) -> dict:
        return {"kind": self.kind, "quant": self.quant.meta() if self.quant else None, "sparse": self.mask is not None,
                "act": self.act, "act_scale": self.act_scale}


@dataclass
class CompressedModel:
    """A compressed model in training form plus what its deployment form and manifest need."""

    model: nn.Module
    config: MethodConfig
    records: dict[str, WeightRecord] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # manifest material: steps, kept, moe, source

    def weight_of(self, name: str) -> torch.Tensor:
        """The weight of module ``name`` as ``[out, in]`` (also through peft wrappers)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        mod = model.get_submodule(name)
        while hasattr(mod, "base_layer"):
            mod = mod.base_layer
        return matrix(mod)

    def verify(self) -> None:
        """Raise CpetError if a pruned weight is non-zero or a quantized weight left its grid."""
        for name, rec in self.records.items():
            w = self.weight_of(name).detach()
            if rec.quant is not None:
                if not torch.equal(w, rec.quant.dequantize(w.dtype).to(w.device)):
                    raise CpetError(f"{name}: weights no longer equal their quantized values")
            if rec.mask is not None and bool((w[~rec.mask.to(w.device)] != 0).any()):
                raise CpetError(f"{name}: pruned weights are no longer zero")

    def deploy_model(self) -> nn.Module:
        """A copy of the model running on the packed weights (see :mod:`cpet.compress.runtime`)."""
        from cpet.compress.runtime import to_deploy

        return to_deploy(self.model, self.records)


def freeze(model: nn.Module) -> nn.Module:
    """Base weights never train: LoRA/recovery modules added later carry all the learning."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Overwrite a module's weight (``value`` as ``[out, in]`` for projections) in place: keeps ties
    and the Parameter object."""
    with torch.no_grad():
        w = matrix(module)
        w.copy_(value.to(w.dtype))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compress(
    model: nn.Module, cfg: MethodConfig | dict, calib: Calibration | None = None, *, name: str = "method"
) -> CompressedModel:
    """Compress a copy of ``model`` (left untouched: it is the distillation teacher).

    ``cfg`` is a parsed config or a raw dict (then parsed under ``compress.methods.<name>``).
    ``calib`` is needed by activation-aware variants (GPTQ, Wanda, structured importance,
    fitted MoE router); asking for one of those without it is a ConfigError.
    """
    if isinstance(cfg, dict):
        cfg = parse_config(name, cfg)
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise CpetError("the model carries peft adapter layers: compress the base model before adding adapters")
    if calib is not None and (not isinstance(calib, list) or not calib or "input_ids" not in calib[0]):
        raise CpetError("calib must be a non-empty list of dicts with an 'input_ids' tensor")
    work = copy.deepcopy(model)
    freeze(work)
    cm = CompressedModel(model=work, config=cfg)
    cm.info["source"] = {
        "parameters": param_count(model),
        "bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
        "model_class": type(model).__name__,
    }
    cm.info["steps"] = []
    apply_step(cm, cfg, calib)
    freeze(cm.model)
    require_change(cm)
    return cm


def refuse(cm: CompressedModel, cfg: MethodConfig, why: str) -> Unsupported:
    """The one-line error for a method that cannot work on this model (raise it)."""
    return Unsupported(f"{cfg.key()}: {cfg.method} cannot compress {cm.info['source']['model_class']}: {why}")


def require_targets(cm: CompressedModel, cfg: MethodConfig, targets: dict) -> dict:
    """``targets`` if non-empty, else raise :class:`Unsupported`: no layer to compress."""
    if not targets:
        raise refuse(cm, cfg, f"no projection layer (nn.Linear / Conv1D) to compress "
                              f"(exclude = {getattr(cfg, 'exclude', [])})")
    return targets


def require_change(cm: CompressedModel) -> None:
    """Raise :class:`Unsupported` unless some weight was quantized, some weight was masked to zero,
    or the structure changed: a method never reports "compressed" on a model it left as it was."""
    masked = any(r.mask is not None and not bool(r.mask.all()) for r in cm.records.values())
    quantized = any(r.quant is not None for r in cm.records.values())
    shrunk = param_count(cm.model) != cm.info["source"]["parameters"] or bool(cm.info.get("moe"))
    if not (masked or quantized or shrunk):
        raise refuse(cm, cm.config, "nothing in the model changed (no layer quantized, pruned or restructured)")


def apply_step(cm: CompressedModel, cfg: MethodConfig, calib: Calibration | None) -> None:
    """Run one registered method on ``cm`` and log what it reports in ``cm.info["steps"]``."""
    out = METHODS[cfg.method].apply(cm, cfg, calib)
    if out is not None:
        cm.info["steps"].append({"method": cfg.method, **out})


def require_calib(cfg: MethodConfig, field_name: str, value: str, calib: Calibration | None) -> None:
    """Raise a ConfigError naming ``field_name`` when an activation-aware option has no data."""
    if calib is None:
        raise ConfigError(
            f"{cfg.key(field_name)}: {value!r} needs calibration data; pass calib= or choose another option"
        )
