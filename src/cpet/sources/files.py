"""Users' own task data: ``jsonl:``, ``csv:``, ``tsv:``, ``parquet:`` files and ``hf:`` datasets.

A reader in ``READERS`` turns a file into records (``(where, dict)`` pairs, ``where`` = "line 3" or
"row 3") and its column names; :func:`load_file_task` maps columns to ``{"text", "label"}`` (one
column, or ``text_template`` over several), keeps the file's own ``split`` column when present, and
records the file's sha256. Every refusal is one line naming the file, the column and the row.
Paths are relative to the project root.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path

from cpet.errors import ConfigError, DataError
from cpet.io import sha256_file, tree_hash

SPLIT_COLUMN = "split"
SPLIT_NAMES = ("train", "validation", "test")

Records = tuple[list[str], Iterator[tuple[str, dict]]]


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x})") from None


def read_jsonl(path: Path) -> Records:
    """One JSON object per line (blank lines skipped); columns = every key seen, first-seen order."""
    rows = []
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"line {lineno}", row))
    return list(dict.fromkeys(k for _, row in rows for k in row)), iter(rows)


def _read_delimited(path: Path, delimiter: str) -> Records:
    reader = csv.DictReader(_io.StringIO(_text(path), newline=""), delimiter=delimiter)
    try:
        columns = list(reader.fieldnames or [])
    except csv.Error as err:
        raise DataError(f"{path} line 1: unreadable header ({err})") from None

    def rows() -> Iterator[tuple[str, dict]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path} line {reader.line_num}: unreadable row ({err})") from None
            if None in row or any(v is None for v in row.values()):
                n = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise DataError(f"{path} line {reader.line_num}: expected {len(columns)} fields, got {n}")
            yield f"line {reader.line_num}", row

    return columns, rows()


def read_csv(path: Path) -> Records:
    """Comma-separated with a header row (RFC 4180 quoting)."""
    return _read_delimited(path, ",")


def read_tsv(path: Path) -> Records:
    """Tab-separated with a header row."""
    return _read_delimited(path, "\t")


def read_parquet(path: Path) -> Records:
    """A Parquet table (through pyarrow); rows numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return table.column_names, ((f"row {i}", r) for i, r in enumerate(table.to_pylist(), 1))


READERS: dict[str, Callable[[Path], Records]] = {
    "jsonl": read_jsonl, "csv": read_csv, "tsv": read_tsv, "parquet": read_parquet,
}


def _template_columns(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _map_rows(where_file: str, columns: list[str], records, *, text_column: str | None,
              label_column: str | None, text_template: str | None, split_name: str | None = None,
              label_names: list[str] | None = None) -> list[dict]:
    """``{"text", "label", "row"[, "split"]}`` per record; refuses missing columns and bad cells."""
    label_column = label_column or "label"
    text_cols = _template_columns(text_template) if text_template else [text_column or "text"]
    for col in [*text_cols, label_column]:
        if col not in columns:
            raise DataError(f"{where_file}: no column {col!r} (columns: {', '.join(columns) or 'none'})")
    has_split = split_name is None and SPLIT_COLUMN in columns
    examples = []

    def cell(where: str, row: dict, col: str, kinds: tuple[type, ...]) -> object:
        value = row.get(col)
        if value is None or isinstance(value, bool) or not isinstance(value, kinds):
            raise DataError(f"{where_file} {where}: column {col!r}: expected "
                            f"{'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        return value

    for where, row in records:
        if text_template:
            text = text_template.format(**{c: cell(where, row, c, (str, int, float)) for c in text_cols})
        else:
            text = cell(where, row, text_cols[0], (str,))
        label = cell(where, row, label_column, (str, int))
        if isinstance(label, int) and label_names is not None:  # an hf ClassLabel column
            if not 0 <= label < len(label_names):
                raise DataError(f"{where_file} {where}: column {label_column!r}: class id {label} "
                                f"outside 0..{len(label_names) - 1}")
            label = label_names[label]
        ex = {"text": text, "label": str(label), "row": f"{where_file} {where}"}
        if has_split or split_name:
            split = split_name or row.get(SPLIT_COLUMN)
            if split not in SPLIT_NAMES:
                raise DataError(f"{where_file} {where}: column {SPLIT_COLUMN!r}: {split!r} is not one "
                                f"of {', '.join(SPLIT_NAMES)}")
            ex["split"] = split
        examples.append(ex)
    return examples


def _check_splits(where_file: str, examples: list[dict]) -> None:
    if not examples:
        raise DataError(f"{where_file}: empty (no rows)")
    present = {ex["split"] for ex in examples if "split" in ex}
    if present and present != set(SPLIT_NAMES):
        missing = ", ".join(s for s in SPLIT_NAMES if s not in present)
        raise DataError(f"{where_file}: column {SPLIT_COLUMN!r} has no {missing} rows "
                        f"(give all of {', '.join(SPLIT_NAMES)} or drop the column)")


def load_file_task(fmt: str, path: str, *, root: Path, labels: list[str],
                   text_column: str | None = None, label_column: str | None = None,
                   text_template: str | None = None) -> tuple[list[dict], list[str], dict]:
    """Examples, the declared labels and a source record (path, format, sha256, columns)."""
    file = Path(root) / path
    if not file.is_file():
        raise DataError(f"{path}: file not found (paths are relative to the project root {root})")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    columns, records = READERS[fmt](file)
    records = list(records)
    if not records:
        raise DataError(f"{path}: empty (no rows)")
    examples = _map_rows(path, columns, records, text_column=text_column,
                         label_column=label_column, text_template=text_template)
    _check_splits(path, examples)
    return examples, sorted(labels), {
        "format": fmt, "path": path, "sha256": sha256_file(file),
        "columns": _columns_record(text_column, label_column, text_template)}


def _columns_record(text_column, label_column, text_template) -> dict:
    text = {"text_template": text_template} if text_template else {"text_column": text_column or "text"}
    return {**text, "label_column": label_column or "label"}


def load_hf(arg: str, *, root: Path, labels: list[str], text_column: str | None = None,
            label_column: str | None = None, text_template: str | None = None
            ) -> tuple[list[dict], list[str], dict]:
    """``<saved dataset dir>`` (``datasets.load_from_disk``) or ``<hub id>[:config]``
    (``datasets.load_dataset``, only where the hub is reachable). A DatasetDict with train,
    validation and test keeps them; a single Dataset (or only ``train``) is split later."""
    name, _, config = arg.partition(":")
    local = Path(root) / name
    if not local.is_dir() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ConfigError(f"hf:{arg}: {local} is not a saved dataset folder and HF_HUB_OFFLINE is set, "
                          f"so the hub id {name!r} cannot be downloaded")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"hf:{arg}: needs the 'datasets' package (pip install datasets)") from None
    try:
        if local.is_dir():
            if config:
                raise ConfigError(f"hf:{arg}: a saved dataset folder takes no ':config'")
            ds = datasets.load_from_disk(str(local))
            digest = tree_hash(local)
        else:
            ds = datasets.load_dataset(name, config or None)
            digest = None
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"hf:{arg}: cannot load ({type(err).__name__}: {err})") from None
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {None: ds}
    if set(parts) not in ({None}, {"train"}, set(SPLIT_NAMES)):
        raise DataError(f"hf:{arg}: splits {', '.join(map(str, parts))}; need train, validation and "
                        f"test, or one split to be divided by fetch.split")
    whole = set(parts) != set(SPLIT_NAMES)
    examples = []
    for split, part in parts.items():
        where = f"hf:{name}" + (f"[{split}]" if split else "")
        feature = part.features.get(label_column or "label")
        examples += _map_rows(where, list(part.column_names),
                              ((f"row {i}", r) for i, r in enumerate(part, 1)),
                              text_column=text_column, label_column=label_column,
                              text_template=text_template, split_name=None if whole else split,
                              label_names=getattr(feature, "names", None))
    _check_splits(f"hf:{arg}", examples)
    source = {"format": "hf", "path": arg, "sha256": digest,
              "columns": _columns_record(text_column, label_column, text_template)}
    if digest is None:
        source["fingerprints"] = {str(k): v._fingerprint for k, v in parts.items()}
    return examples, sorted(labels), source
