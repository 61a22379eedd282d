"""LoRA through peft: validated settings, target discovery, attach / save / load an adapter."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from cpet.compress.arch import is_projection, projection
from cpet.config.library import LoraSettings
from cpet.errors import ConfigError

ADAPTER_NAME = "default"


def _linear_leaf(module: nn.Module) -> bool:
    """A projection (``nn.Linear``, ``Conv1D``), or a tuner layer (e.g. a recovery module) whose base is one."""
    if isinstance(module, BaseTunerLayer):
        return is_projection(module.get_base_layer())
    return is_projection(module)


def _matches(name: str, targets: list[str]) -> bool:
    """peft's suffix matching of ``target_modules`` entries."""
    return any(name == t or name.endswith("." + t) for t in targets)


def fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """peft's ``fan_in_fan_out``: True when every targeted projection stores ``[in, out]`` (GPT-2's
    Conv1D). With a mix (Conv1D attention, nn.Linear MoE experts) peft sets it per layer itself."""
    kinds = {p.transposed for name, module in model.named_modules()
             if (p := projection(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module))
             and _matches(name.replace(".base_layer", ""), targets)}
    return kinds == {True}


def _is_attention(name: str, module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() or name.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention")


def attention_targets(model: nn.Module) -> list[str]:
    """Child names of the linear layers directly under attention modules (e.g. q/k/v/o_proj)."""
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or not _is_attention(name, module):
            continue
        names.update(child for child, sub in module.named_children() if _linear_leaf(sub))
    if not names:
        raise ConfigError(f"lora.target_modules: no linear layers under attention modules in {type(model).__name__}")
    return sorted(names)


def linear_targets(model: nn.Module) -> list[str]:
    """Full names of every linear leaf except the output embedding (LM head) and adapter internals."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, BaseTunerLayer):
            skip.append(name + ".")
        if module is head or (isinstance(module, BaseTunerLayer) and module.get_base_layer() is head):
            continue
        if _linear_leaf(module):
            out.append(name)
    return out


def lora_config(settings: LoraSettings, model: nn.Module | None = None) -> LoraConfig:
    """A causal-LM ``LoraConfig`` from the settings; default targets are discovered on ``model``."""
    targets = settings.target_modules
    if targets is None:
        if model is None:
            raise ConfigError("lora.target_modules: pass the model to discover attention projections")
        targets = attention_targets(model)
    flip = model is not None and fan_in_fan_out(model, list(targets))
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, fan_in_fan_out=flip,
                      target_modules=list(targets), task_type="CAUSAL_LM", bias="none")


def wrap_lora(model: nn.Module, config: LoraConfig, adapter_name: str = ADAPTER_NAME) -> PeftModel:
    """``get_peft_model`` that expects recovery layers: LoRA wrapping a tuner layer is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
        return get_peft_model(model, config, adapter_name=adapter_name)


def attach_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = ADAPTER_NAME) -> PeftModel:
    """Wrap ``model`` with a fresh, trainable LoRA adapter (peft's init: B = 0)."""
    return wrap_lora(model, lora_config(settings, model), adapter_name=adapter_name)


def save_adapter(model: PeftModel, path: str | os.PathLike, adapter_name: str = ADAPTER_NAME) -> Path:
    """Write a standard peft adapter directory (``adapter_config.json`` + safetensors)."""
    path = Path(path)
    model.save_pretrained(str(path), selected_adapters=[adapter_name], safe_serialization=True)
    if adapter_name != ADAPTER_NAME:  # peft nests non-default adapters one level down
        nested = path / adapter_name
        for f in nested.iterdir():
            f.replace(path / f.name)
        nested.rmdir()
    _sort_target_modules(path / "adapter_config.json")
    return path


def _sort_target_modules(config_file: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in hash order, which changes from one
    process to the next: sorted, the same adapter is the same bytes (DVC and the flow agree)."""
    import json

    from cpet.io import write_text

    raw = json.loads(config_file.read_text())
    if isinstance(raw.get("target_modules"), list):
        raw["target_modules"] = sorted(raw["target_modules"])
        write_text(config_file, json.dumps(raw, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False,
                 adapter_name: str = ADAPTER_NAME) -> PeftModel:
    """Put an existing peft adapter directory (e.g. the user's own) on ``model``."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{path}: not a peft adapter directory (no adapter_config.json)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=trainable)
