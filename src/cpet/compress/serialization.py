"""Save and load compressed models: ``<out>/`` = weights (safetensors) + config.json + manifest.json.

Quantized weights are stored packed (``<module>.weight.packed`` + ``.scales``), pruned ones as a
bitmask plus the surviving values (``.mask`` + ``.values``, or the surviving packed levels when
also quantized); everything else is the float state dict, tied tensors once (``aliases``).
When nothing is packed and no MoE module was added (structured pruning alone) the weights file
is ``model.safetensors`` and vanilla ``AutoModelForCausalLM.from_pretrained(out)`` loads it;
otherwise it is ``compressed.safetensors`` so that vanilla loading fails loudly instead of
initialising missing weights at random.

``load_compressed`` rebuilds the training form bit-exactly (it dequantizes with the same
function ``compress`` used) and, for ``form="deploy"``, converts it to the packed runtime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.modeling_utils import no_init_weights

from cpet.compress import qmath
from cpet.compress.arch import matrix
from cpet.compress.core import CompressedModel, QuantRecord, WeightRecord, freeze, set_weight
from cpet.compress.registry import METHODS
from cpet.compress.summary import summarize
from cpet.env import TORCH_GLOBALS
from cpet.errors import CpetError
from cpet.io import atomic_dir, write_json

FORMAT = "cpet-compressed/1"
SUFFIXES = (".weight.packed", ".weight.scales", ".weight.mask", ".weight.values")


def deploy_tensors(cm: CompressedModel) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """Tensors to write, per-weight storage description, and aliases of tied tensors."""
    state = cm.model.state_dict()
    recorded = {f"{n}.weight": n for n in cm.records}
    ident = lambda t: (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # noqa: E731
    first: dict[tuple, str] = {}
    for key, t in state.items():
        if t.numel():
            first.setdefault(ident(t), key)
    tensors, aliases = {}, {}
    for key, t in state.items():
        src = first.get(ident(t), key) if t.numel() else key
        if src != key:
            aliases[key] = src
        elif key not in recorded:
            tensors[key] = t.detach().contiguous()
    layers = {}
    for name, rec in cm.records.items():
        w = matrix(cm.model.get_submodule(name))  # [out, in], also for Conv1D
        if rec.quant is not None:
            levels = rec.quant.levels if rec.mask is None else rec.quant.levels[rec.mask].unsqueeze(0)
            tensors[f"{name}.weight.packed"] = qmath.pack(levels, rec.quant.bits)
            tensors[f"{name}.weight.scales"] = rec.quant.scales.float().contiguous()
        if rec.mask is not None:
            tensors[f"{name}.weight.mask"] = qmath.pack_mask(rec.mask)
            if rec.quant is None:
                tensors[f"{name}.weight.values"] = w.detach()[rec.mask].contiguous()
        layers[name] = {**rec.meta(), "shape": list(w.shape)}
    return {k: v.cpu() for k, v in tensors.items()}, layers, aliases


def save_compressed(cm: CompressedModel, out_dir: str | os.PathLike, source_hash: str | None = None) -> dict:
    """Write ``out_dir`` atomically; returns the manifest (also written as manifest.json)."""
    tensors, layers, aliases = deploy_tensors(cm)
    vanilla = not cm.records and not cm.info.get("moe")
    weights_file = "model.safetensors" if vanilla else "compressed.safetensors"
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / weights_file), metadata={"format": "pt"})
        cm.model.config.save_pretrained(tmp)
        if getattr(cm.model, "generation_config", None) is not None:
            cm.model.generation_config.save_pretrained(tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "method": cm.config.method,
            "name": cm.config.key(),
            "params": cm.config.model_dump(mode="json"),
            "steps": cm.info.get("steps", []),
            "model_class": type(cm.model).__name__,
            "dtype": str(next(cm.model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(cm.model.config, "_attn_implementation", None),
            "source": {**cm.info.get("source", {}), "sha256": source_hash},
            "weights_file": weights_file,
            **summarize(cm, bytes_on_disk=size),
            "weights": layers,
            "aliases": aliases,
            "kept": cm.info.get("kept"),
            "moe": cm.info.get("moe"),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise CpetError(f"{out_dir}: no manifest.json, not a compressed model directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CpetError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _records(tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, WeightRecord]:
    records = {}
    for name, meta in layers.items():
        rows, cols = meta["shape"]
        mask = qmath.unpack_mask(tensors[f"{name}.weight.mask"], cols) if meta["sparse"] else None
        quant = None
        if meta["quant"]:
            q = meta["quant"]
            bits, codebook = q["bits"], q["codebook"]
            packed = tensors[f"{name}.weight.packed"]
            if mask is None:
                levels = qmath.unpack(packed, bits, cols)
            else:
                levels = torch.full((rows, cols), qmath.zero_level(bits, codebook), dtype=torch.uint8)
                levels[mask] = qmath.unpack(packed, bits, int(mask.sum()))[0]
            quant = QuantRecord(bits, q["group_size"], levels.contiguous(), tensors[f"{name}.weight.scales"], codebook)
        records[name] = WeightRecord(meta["kind"], quant, mask, meta.get("act"), meta.get("act_scale"))
    return records


def load_compressed_model(out_dir: str | os.PathLike) -> CompressedModel:
    """The saved compressed model in training form, with its records (e.g. to ``verify()``)."""
    from cpet.compress.moe import install_skeleton
    from cpet.compress.w8a8 import install as install_act_quant

    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    config = transformers.AutoConfig.from_pretrained(out_dir)
    if m.get("attn_implementation"):
        config._attn_implementation = m["attn_implementation"]
    cls = getattr(transformers, m["model_class"], None)
    if cls is None:
        raise CpetError(f"{out_dir}: model class {m['model_class']} is not in this transformers version")
    with TORCH_GLOBALS, no_init_weights():  # no_init_weights patches torch.nn.init for every thread
        model = cls(config)
    model.tie_weights()  # skipped by no_init_weights
    model.to(getattr(torch, m["dtype"]))
    if m.get("moe"):
        install_skeleton(model, m["moe"])
    tensors = load_file(str(out_dir / m["weights_file"]))
    records = _records(tensors, m["weights"])
    state = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    for alias, src in m["aliases"].items():
        if src in state:
            state[alias] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {f"{n}.weight" for n in records} | set(m["aliases"])
    if unexpected or set(missing) - allowed:
        raise CpetError(
            f"{out_dir}: weights do not match the model: missing {sorted(set(missing) - allowed)[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, rec in records.items():
        mod = model.get_submodule(name)
        if rec.quant is not None:
            set_weight(mod, rec.quant.dequantize())
        else:
            w = torch.zeros_like(matrix(mod))
            w[rec.mask] = tensors[f"{name}.weight.values"].to(w.dtype)
            set_weight(mod, w)
    for alias, src in m["aliases"].items():  # tied to a packed weight: HF ties at init, check
        a, s = model.get_parameter(alias), model.get_parameter(src)
        if a is not s:
            with torch.no_grad():
                a.copy_(s)
    install_act_quant(model, records)
    cfg = METHODS[m["params"]["method"]].config_cls.from_raw(m["params"], m["name"])
    info = {k: m[k] for k in ("steps", "source", "kept", "moe") if m.get(k) is not None}
    return CompressedModel(freeze(model), cfg, records, info)


def load_compressed(out_dir: str | os.PathLike, form: Literal["train", "deploy"] = "train") -> torch.nn.Module:
    """Load a saved compressed model: float training form (peft-wrappable) or packed deployment form."""
    if form not in ("train", "deploy"):
        raise CpetError(f"form must be 'train' or 'deploy', got {form!r}")
    cm = load_compressed_model(out_dir)
    return cm.model if form == "train" else cm.deploy_model()
