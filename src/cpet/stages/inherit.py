"""Stage ``inherit``: each task's teacher adapter put onto each compressed model.

Tensors are copied by name; where structured pruning removed rows/columns (the compressed
model's ``kept`` map) the adapter's A/B matrices are sliced to match. Outputs per method
``<m>``: ``models/inherit/<m>/<task>/`` (a standard peft adapter directory). Evaluated untrained,
this is the ``compressed+inherit-only`` row.
"""

from __future__ import annotations

from pathlib import Path

from cpet import io, paths
from cpet.config import Params
from cpet.stages.common import load_compressed_base

OUT_DIR = Path("models") / "inherit"


def inherit(params: Params, root: str | Path = ".", method: str | None = None) -> dict:
    from cpet.pet import inherit_adapter, save_adapter

    root = Path(root)
    out = {}
    for name in params.recover_methods():
        if method not in (None, name):
            continue
        with io.atomic_dir(root / OUT_DIR / name) as tmp:
            for task in params.tasks:
                model, kept = load_compressed_base(root, name)
                peft_model = inherit_adapter(paths.require(root, paths.teacher_adapter(task)), model, kept)
                save_adapter(peft_model, tmp / task)
        out[name] = {"tasks": list(params.tasks), "sliced": bool(kept)}
    return out
