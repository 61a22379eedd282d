"""Stage metrics of a compressed model: size, sparsity and (MoE) skipped FFN compute."""

from __future__ import annotations

import torch

from cpet.compress.arch import projection
from cpet.compress.core import CompressedModel, param_count


def summarize(cm: CompressedModel, bytes_on_disk: int | None = None) -> dict:
    """Parameter counts, bytes on disk (estimated from the tensors to write unless given),
    mask sparsity, and the measured fraction of FFN neuron work skipped by MoE routing."""
    from cpet.compress.moe import moe_stats
    from cpet.compress.serialization import deploy_tensors

    model = cm.model
    params = {id(p): p for p in model.parameters()}.values()
    if bytes_on_disk is None:
        tensors, _, _ = deploy_tensors(cm)
        bytes_on_disk = sum(t.numel() * t.element_size() for t in tensors.values())
    masks = [r.mask for r in cm.records.values() if r.mask is not None]
    linear = [p.weight for m in model.modules() if (p := projection(m)) is not None]
    zeros = sum(int((w == 0).sum()) for w in linear)
    source = cm.info.get("source", {})
    out = {
        "parameters": param_count(model),
        "parameters_nonzero": sum(int(torch.count_nonzero(p)) for p in params),
        "source_parameters": source.get("parameters"),
        "source_bytes": source.get("bytes"),
        "bytes_on_disk": bytes_on_disk,
        "compression_ratio": (source["bytes"] / bytes_on_disk) if source.get("bytes") else None,
        "sparsity": (1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)) if masks else 0.0,
        "linear_zero_fraction": zeros / max(sum(w.numel() for w in linear), 1),
        "quantized_weights": sum(r.quant is not None for r in cm.records.values()),
        "bits": sorted({r.quant.bits for r in cm.records.values() if r.quant is not None}),
    }
    moe = cm.info.get("moe")
    if moe:
        measured = moe.get("measured_on_calibration") or {}
        live = moe_stats(model)
        out["skipped_ffn_fraction"] = (
            live["skipped_ffn_fraction"]
            if live["tokens"]
            else measured.get("skipped_ffn_fraction", moe["expected_skipped_ffn_fraction"])
        )
        out["router_cost_fraction"] = live["router_cost_fraction"]
    return out
