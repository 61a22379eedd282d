"""Prepared task data: deterministic stratified splits as JSONL plus a manifest.

Layout per task: ``data/processed/<task>/{train,validation,test}.jsonl`` (one
``{"text": ..., "label": ...}`` object per line) and ``manifest.json`` (label set, counts per
split and class, seed, source and its hash).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from cpet.errors import DataError

SPLITS = ("train", "validation", "test")


def dedupe(examples: list[dict]) -> tuple[list[dict], int]:
    """Drop repeated texts (keep the first), and texts that carry conflicting labels entirely.

    Duplicates would otherwise land in two splits (leakage) or twice in one split.
    """
    labels_by_text: dict[str, set[str]] = defaultdict(set)
    for ex in examples:
        labels_by_text[ex["text"]].add(ex["label"])
    seen: set[str] = set()
    kept = []
    for ex in examples:
        text = ex["text"]
        if text in seen or len(labels_by_text[text]) > 1:
            continue
        seen.add(text)
        kept.append(ex)
    return kept, len(examples) - len(kept)


def stratified_split(
    examples: list[dict],
    *,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    caps: dict[str, int],
) -> dict[str, list[dict]]:
    """Split each class by the fractions, then cap each split keeping class proportions.

    Deterministic for a given seed and input order. Every class gets at least one example in
    validation and test when it has at least three examples.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        by_class[ex["label"]].append(ex)
    parts: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n = len(items)
        n_val = max(1, round(n * validation_fraction)) if n >= 3 else 0
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        parts["validation"][label] = items[:n_val]
        parts["test"][label] = items[n_val : n_val + n_test]
        parts["train"][label] = items[n_val + n_test :]
    out = {}
    for split in SPLITS:
        quota = _proportional(
            {label: len(items) for label, items in parts[split].items()}, caps[split]
        )
        rows = [ex for label in sorted(quota) for ex in parts[split][label][: quota[label]]]
        rng.shuffle(rows)
        out[split] = rows
    return out


def _proportional(sizes: dict[str, int], cap: int) -> dict[str, int]:
    """Largest-remainder allocation of ``min(cap, total)`` slots in proportion to ``sizes``."""
    total = sum(sizes.values())
    if total <= cap:
        return dict(sizes)
    exact = {k: n * cap / total for k, n in sizes.items()}
    quota = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: cap - sum(quota.values())]:
        quota[k] += 1
    return quota


def class_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["label"] for r in rows).items()))


def manifest(task: str, labels: list[str], splits: dict[str, list[dict]], seed: int,
             source: dict[str, Any], dropped_duplicates: int) -> dict[str, Any]:
    return {
        "task": task,
        "labels": labels,
        "seed": seed,
        "source": source,
        "dropped_duplicates": dropped_duplicates,
        "counts": {s: len(splits[s]) for s in SPLITS},
        "class_counts": {s: class_counts(splits[s]) for s in SPLITS},
    }


def read_jsonl(path: str | Path, label: str | None = None) -> list[Any]:
    """Read one JSON value per line; a line that is not UTF-8 or not JSON raises DataError naming
    ``label`` (e.g. ``task/split``, default the file) and the line."""
    path = Path(path)
    where = f"{label}: {path}" if label else str(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}:{lineno}: not valid UTF-8 "
                                f"(byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}:{lineno}: invalid JSON ({err.msg})") from None
    return rows


def task_dir(root: str | Path, task: str) -> Path:
    return Path(root) / "data" / "processed" / task


def load_split(root: str | Path, task: str, split: str) -> list[dict]:
    return read_jsonl(task_dir(root, task) / f"{split}.jsonl", label=f"{task}/{split}")


def load_manifest(root: str | Path, task: str) -> dict[str, Any]:
    path = task_dir(root, task) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the fetch stage first")
    return json.loads(path.read_text())
