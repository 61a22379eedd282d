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
    """Drop texts that carry conflicting labels entirely, then repeated texts (keep the first).

    Duplicates would otherwise land in two splits (leakage) or twice in one split.
    """
    kept, dropped = clean(examples, labels=None)
    return kept, sum(dropped.values())


# Cleaning rules in the order they run; each row is counted under the first rule that drops it.
# Length rules see the whitespace-normalised text before fetch.max_chars truncates it; conflicts
# and duplicates see the truncated text (what is written).
RULES = ("drop_unknown_labels", "min_chars", "max_chars", "drop_conflicts", "drop_duplicates")


def _conflicting(examples: list[dict]) -> set[str]:
    labels_by_text: dict[str, set[str]] = defaultdict(set)
    for ex in examples:
        labels_by_text[ex["text"]].add(ex["label"])
    return {t for t, labels in labels_by_text.items() if len(labels) > 1}


def clean(examples: list[dict], *, labels: list[str] | None, truncate=lambda text: text,
          label_column: str = "label",
          min_chars: int | None = None, max_chars: int | None = None,
          drop_unknown_labels: bool = False, drop_conflicts: bool = True,
          drop_duplicates: bool = True) -> tuple[list[dict], dict[str, int]]:
    """Apply the task's cleaning rules; returns the kept rows and a count per rule that is on.

    A label outside ``labels`` (when given) is an error naming the row unless
    ``drop_unknown_labels``. Nothing is dropped except by a rule that is on, and counted.
    """
    dropped: dict[str, int] = {}
    rows = examples
    if labels is not None:
        declared = set(labels)
        unknown = [ex for ex in rows if ex["label"] not in declared]
        if unknown and not drop_unknown_labels:
            ex = unknown[0]
            raise DataError(f"{ex.get('row', 'task data')}: column {label_column!r}: label "
                            f"{ex['label']!r} is not a declared label "
                            f"({', '.join(sorted(declared))}); {len(unknown)} such row(s); "
                            f"set clean.drop_unknown_labels to drop them")
        if drop_unknown_labels:
            rows = [ex for ex in rows if ex["label"] in declared]
            dropped["drop_unknown_labels"] = len(unknown)
    for rule, keep in (("min_chars", lambda n, v: n >= v), ("max_chars", lambda n, v: n <= v)):
        value = min_chars if rule == "min_chars" else max_chars
        if value is not None:
            before = len(rows)
            rows = [ex for ex in rows if keep(len(ex["text"]), value)]
            dropped[rule] = before - len(rows)
    rows = [{**ex, "text": truncate(ex["text"])} for ex in rows]
    if drop_conflicts:
        conflicting = _conflicting(rows)
        before = len(rows)
        rows = [ex for ex in rows if ex["text"] not in conflicting]
        dropped["drop_conflicts"] = before - len(rows)
    if drop_duplicates:
        seen: set[str] = set()
        kept = []
        for ex in rows:
            if ex["text"] not in seen:
                seen.add(ex["text"])
                kept.append(ex)
        dropped["drop_duplicates"] = len(rows) - len(kept)
        rows = kept
    return rows, dropped


def given_splits(examples: list[dict], caps: dict[str, int]) -> dict[str, list[dict]] | None:
    """The data's own splits (each row's ``split``), capped class-proportionally keeping the
    file's order; ``None`` when the rows carry no split."""
    if not any("split" in ex for ex in examples):
        return None
    out = {}
    for split in SPLITS:
        rows = [ex for ex in examples if ex["split"] == split]
        quota = _proportional(dict(Counter(ex["label"] for ex in rows)), caps[split])
        taken: Counter = Counter()
        out[split] = []
        for ex in rows:
            if taken[ex["label"]] < quota[ex["label"]]:
                taken[ex["label"]] += 1
                out[split].append(ex)
    return out


def strip(rows: list[dict]) -> list[dict]:
    """Only what a split file holds: ``{"text", "label"}``."""
    return [{"text": ex["text"], "label": ex["label"]} for ex in rows]


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
             source: dict[str, Any], dropped: dict[str, int],
             cleaning: dict[str, Any] | None = None, given_splits: bool = False) -> dict[str, Any]:
    """``dropped``: rows removed per cleaning rule (``dropped_duplicates`` keeps the old total of
    conflicts + duplicates); ``cleaning``: the rules as configured."""
    return {
        "task": task,
        "labels": labels,
        "seed": seed,
        "source": source,
        "dropped_duplicates": dropped.get("drop_conflicts", 0) + dropped.get("drop_duplicates", 0),
        "cleaning": {"rules": cleaning or {}, "dropped": dropped},
        "splits_from_source": given_splits,
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
