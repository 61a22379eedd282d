"""Stage ``teacher``: per task, the adapter on the original model and its cached outputs.

Outputs per task ``<task>``: ``models/teacher/<task>/adapter/`` (a standard peft adapter: trained
here, or copied from ``teacher.adapters.<task>``), ``models/teacher/<task>/cache.safetensors``
(the teacher's label logits and hidden states on the training split, reused by every CPET run),
``reports/teacher/<task>.json`` and the learning curve ``reports/curves/teacher/<task>.json``
(one entry per step; empty for a given adapter).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cpet import io
from cpet.config import Params
from cpet.stages.common import (BASE_DIR, CURVES, checkpoint_dir, data_hashes, load_base, load_tokenizer, seeded_init,
                                task_identity, task_views, train_adapter)

OUT_DIR = Path("models") / "teacher"
REPORT_DIR = Path("reports") / "teacher"


def teacher_one(params: Params, root: Path, view) -> dict:
    from cpet.distill import build_teacher_cache
    from cpet.pet import attach_lora, load_adapter, save_adapter

    cfg = params.teacher
    model, tokenizer = load_base(root)
    given = cfg.adapters.get(view.name)
    metrics: dict = {"task": view.name}
    with io.atomic_dir(Path(root) / OUT_DIR / view.name) as tmp:
        if given:
            peft_model = load_adapter(model, given)
            shutil.copytree(given, tmp / "adapter")
            metrics["adapter"] = f"given: {given}"
            io.write_json(Path(root) / CURVES / "teacher" / f"{view.name}.json", [])
        else:
            with seeded_init(cfg.train.seed):
                peft_model = attach_lora(model, cfg.lora)
            inputs = {"base": io.tree_hash(Path(root) / BASE_DIR), **task_identity(view),
                      "data": data_hashes(root, view.name), "lora": cfg.lora.model_dump(),
                      "train": cfg.train.model_dump()}
            metrics["train"], history = train_adapter(
                peft_model, tokenizer, view, cfg.train, checkpoint_dir(params, root, "teacher", view.name, inputs=inputs))
            io.write_json(Path(root) / CURVES / "teacher" / f"{view.name}.json", history)
            save_adapter(peft_model, tmp / "adapter")
            metrics["adapter"] = "trained"
        t0 = time.perf_counter()
        rows = view.rows("train")
        cache = build_teacher_cache(
            peft_model.eval(), tokenizer, [r["text"] for r in rows], view.template, view.verbalizer,
            layers=cfg.cache.layers, max_length=cfg.train.max_length,
            batch_size=cfg.cache.batch_size,
        )
        cache.save(tmp / "cache.safetensors")
        metrics["cache_seconds"] = round(time.perf_counter() - t0, 1)
    io.write_json(Path(root) / REPORT_DIR / f"{view.name}.json", metrics)
    return metrics


def teacher(params: Params, root: str | Path = ".", task: str | None = None) -> dict:
    root = Path(root)

    views = task_views(params, root, load_tokenizer(root))
    return {v.name: teacher_one(params, root, v) for v in views if task in (None, v.name)}
