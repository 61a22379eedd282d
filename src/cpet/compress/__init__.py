"""Compression of HF causal LMs: each method registers under a name in :data:`METHODS`.

Public API::

    cfg = parse_config("my_int4", {"method": "int4", "group_size": 64})
    cm = compress(model, cfg, calib)          # CompressedModel: .model is the float training form
    cm.verify()                               # masks / quantization grids intact?
    summarize(cm)                             # parameters, bytes on disk, sparsity, MoE skip
    save_compressed(cm, out_dir, source_hash=...)
    load_compressed(out_dir, form="train")    # or form="deploy": packed int weights at runtime

Methods: int8, int4, int3, nf4 (CUDA only), w8a8 (int8 weights and activations), unstructured, 2:4 / nm, structured, moe, mixed.
Importing this package only defines classes and fills the registry.
"""

from cpet.compress import mixed, moe, prune, quant, structured, w8a8  # noqa: F401  (register methods)
from cpet.compress.config import MethodConfig
from cpet.compress.core import CompressedModel, QuantRecord, WeightRecord, compress
from cpet.compress.moe import MoEFFN, moe_stats
from cpet.compress.registry import METHODS, Method, parse_config, register
from cpet.compress.runtime import QuantEmbedding, QuantLinear
from cpet.compress.serialization import load_compressed, load_compressed_model, read_manifest, save_compressed
from cpet.compress.structured import slice_state
from cpet.compress.summary import summarize

__all__ = [
    "METHODS",
    "CompressedModel",
    "Method",
    "MethodConfig",
    "MoEFFN",
    "QuantEmbedding",
    "QuantLinear",
    "QuantRecord",
    "WeightRecord",
    "compress",
    "load_compressed",
    "load_compressed_model",
    "moe_stats",
    "parse_config",
    "read_manifest",
    "register",
    "save_compressed",
    "slice_state",
    "summarize",
]
