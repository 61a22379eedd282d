"""A task bundle on a (compressed) base: LoRA adapter + optional recovery modules, one directory.

Composition (verified with peft 0.21): recovery layers are injected into the base model first
(``peft.inject_adapter_in_model``); the LoRA ``PeftModel`` then wraps each recovery layer like any
linear layer (LoRA's dispatch looks through ``get_base_layer``), so a targeted projection computes
``W_c x + rec(x) + lora(x)`` and both adapters train together.

Layout::

    bundle/
      bundle.json            {"format": "cpet-bundle", "version": 1, "recovery": <RecoveryConfig dict> | null}
      adapter/               standard peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors)
      recovery.safetensors   "<module>.rec_A.weight" / "<module>.rec_B.weight", module names of the base model
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from peft import PeftModel, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from cpet.errors import CpetError
from cpet.io import atomic_dir, write_json
from cpet.pet.lora import linear_targets, load_adapter, save_adapter
from cpet.pet.recovery import RecoveryConfig, RecoveryLayer, RecoverySettings
from cpet.pet.recovery.config import peft_recovery_config

RECOVERY_NAME = "recover"
FORMAT = "cpet-bundle"
VERSION = 1


def _clean(name: str) -> str:
    """Module path in the plain base model: drop peft's ``base_model.model.`` and ``.base_layer``."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def recovery_layers(model: nn.Module) -> dict[str, RecoveryLayer]:
    """Recovery layers by their module name in the plain base model."""
    return {_clean(n): m for n, m in model.named_modules() if isinstance(m, RecoveryLayer)}


def recovery_config(model: nn.Module) -> RecoveryConfig | None:
    """The recovery adapter's config, wherever peft left it on the (wrapped) model."""
    for m in model.modules():
        cfg = getattr(m, "_cpet_recovery_config", None)
        if cfg is not None:
            return cfg
    return None


def attach_recovery(model: nn.Module, settings: RecoverySettings | RecoveryConfig) -> nn.Module:
    """Inject zero-initialised recovery modules into ``model`` in place (before wrapping with LoRA)."""
    if isinstance(model, PeftModel):
        raise CpetError("attach recovery modules to the base model before wrapping it with LoRA")
    if recovery_layers(model):
        raise CpetError("model already has recovery modules")
    cfg = settings if isinstance(settings, RecoveryConfig) else peft_recovery_config(
        settings, settings.target_modules or linear_targets(model))
    model = inject_adapter_in_model(cfg, model, adapter_name=RECOVERY_NAME)
    # keep the config out of `model.peft_config`: LoRA's wrapper would adopt it as one of its own adapters
    del model.peft_config
    model._cpet_recovery_config = cfg
    for layer in recovery_layers(model).values():
        layer.requires_grad_(False)
        for name in layer.adapter_layer_names:
            getattr(layer, name).requires_grad_(True)
    return model


def recovery_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.rec_A.weight": ..., "<module>.rec_B.weight": ...}`` on CPU (the bundle's tensors)."""
    out = {}
    for path, layer in recovery_layers(model).items():
        for factor in ("rec_A", "rec_B"):
            out[f"{path}.{factor}.weight"] = getattr(layer, factor)[RECOVERY_NAME].weight.detach().cpu().contiguous()
    return out


def recovery_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A_rec / B_rec parameters of every recovery layer."""
    layers = recovery_layers(model).values()
    return [p for layer in layers for f in ("rec_A", "rec_B") for p in getattr(layer, f).parameters()]


def save_bundle(model: PeftModel, path: str | os.PathLike) -> Path:
    """Write LoRA adapter + recovery weights + ``bundle.json`` atomically to ``path``."""
    if not isinstance(model, PeftModel):
        raise CpetError("save_bundle expects the LoRA PeftModel (recovery modules optional)")
    cfg = recovery_config(model)
    with atomic_dir(path) as tmp:
        save_adapter(model, tmp / "adapter", adapter_name=model.active_adapter)
        if cfg is not None:
            save_file(recovery_state(model), str(tmp / "recovery.safetensors"), metadata={"format": FORMAT})
        write_json(tmp / "bundle.json", {"format": FORMAT, "version": VERSION,
                                         "recovery": None if cfg is None else _config_dict(cfg)})
    return Path(path)


def _config_dict(cfg: RecoveryConfig) -> dict:
    """The fields that rebuild the same recovery layers (JSON-safe)."""
    d = cfg.to_dict()
    if isinstance(d.get("target_modules"), set):
        d["target_modules"] = sorted(d["target_modules"])
    return {k: d[k] for k in ("r", "alpha", "act", "target_modules")}


def load_bundle(base_model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> PeftModel:
    """Rebuild the bundle on ``base_model`` (the same compressed base it was trained on) in one call."""
    path = Path(path)
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise CpetError(f"{path}: not a cpet bundle (no bundle.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CpetError(f"{meta_file}: unsupported bundle format {meta.get('format')!r} v{meta.get('version')}")
    if meta["recovery"] is not None:
        base_model = attach_recovery(base_model, RecoveryConfig(**meta["recovery"]))
        layers = recovery_layers(base_model)
        state = load_file(str(path / "recovery.safetensors"))
        expected = set(recovery_state(base_model))
        if set(state) != expected:
            raise CpetError(f"{path}: recovery tensors do not match the base model "
                            f"(missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
        with torch.no_grad():
            for key, tensor in state.items():
                module, factor, _ = key.rsplit(".", 2)
                getattr(layers[module], factor)[RECOVERY_NAME].weight.copy_(tensor)
    model = load_adapter(base_model, path / "adapter", trainable=trainable)
    for p in recovery_parameters(model):
        p.requires_grad_(trainable)
    return model


def merge_bundle(model: PeftModel) -> nn.Module:
    """Fold LoRA and identity recovery modules into the base weights; returns the plain model.

    A GELU recovery module is not linear, so it cannot be folded: this raises instead of dropping it.
    """
    for name, layer in recovery_layers(model).items():
        if not layer.mergeable(RECOVERY_NAME):
            raise CpetError(f"{name}: recovery activation is not identity; the bundle cannot be merged")
        layer.merge()
    # LoRA's merge_and_unload replaces each wrapper by get_base_layer(), dropping the (merged) recovery layers
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        plain = model.merge_and_unload()
    for name, module in list(plain.named_modules()):
        if isinstance(module, RecoveryLayer):  # recovery on layers LoRA did not wrap
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, module.get_base_layer())
    if hasattr(plain, "_cpet_recovery_config"):
        del plain._cpet_recovery_config
    return plain
