"""Knowledge inheritance: the teacher's LoRA tensors, sliced like the structured pruning sliced W."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from cpet.errors import CpetError
from cpet.pet.lora import wrap_lora

#: which LoRA factor a ``kept`` axis slices: kept output rows cut B's rows, kept input columns A's columns
SLICES = {"out": ("lora_B", 0), "in": ("lora_A", 1)}


def _module_of(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``lora_A``)."""
    head, part, _ = key.rpartition(".lora_")
    if not part:
        return key, ""
    factor = "lora_" + key[len(head) + len(part):].split(".", 1)[0]
    return head.removeprefix("base_model.model."), factor


def slice_lora_state(state: dict[str, torch.Tensor], kept: dict | None) -> dict[str, torch.Tensor]:
    """Apply a structured-pruning ``kept`` map (``{module: {"out"|"in": [indices]}}``) to LoRA tensors."""
    if not kept:
        return dict(state)
    out = {}
    for key, tensor in state.items():
        module, factor = _module_of(key)
        for axis, idx in kept.get(module, {}).items():
            name, dim = SLICES[axis]
            if factor == name:
                tensor = tensor.index_select(dim, torch.as_tensor(idx, dtype=torch.long))
        out[key] = tensor
    return out


def read_adapter_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a peft adapter directory (names as peft saves them, without adapter name)."""
    path = Path(path)
    f = path / "adapter_model.safetensors"
    if not f.is_file():
        raise CpetError(f"{path}: no adapter_model.safetensors (only safetensors adapters are supported)")
    return load_file(str(f))


def inherit_adapter(teacher_adapter_dir: str | os.PathLike, compressed_model: nn.Module,
                    kept: dict | None = None, adapter_name: str = "default") -> PeftModel:
    """A trainable LoRA on ``compressed_model`` initialised from the teacher's adapter directory.

    Tensors are copied by name; ``kept`` (from structured pruning) slices B rows / A columns.
    Every teacher tensor must find a module of the right shape, otherwise this raises.
    """
    config = LoraConfig.from_pretrained(str(teacher_adapter_dir))
    config.inference_mode = False
    model = wrap_lora(compressed_model, config, adapter_name=adapter_name)
    state = slice_lora_state(read_adapter_state(teacher_adapter_dir), kept)
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    for key, tensor in state.items():
        stem, _, leaf = key.rpartition(".")
        live = f"{stem}.{adapter_name}.{leaf}"
        if live not in own:
            raise CpetError(f"{teacher_adapter_dir}: adapter tensor {key} has no module in the compressed model")
        if own[live].shape != tensor.shape:
            raise CpetError(f"{teacher_adapter_dir}: {key} is {tuple(tensor.shape)} after slicing, "
                            f"the compressed model needs {tuple(own[live].shape)} (missing or wrong `kept` entry?)")
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise CpetError(f"{teacher_adapter_dir}: unexpected adapter tensors {result.unexpected_keys[:3]}")
    return model
