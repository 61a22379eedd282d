"""Where each artifact lives, which stage makes it, and the check a stage runs before reading one.

A stage reading an input that is missing or damaged (a fresh clone, a killed copy, a truncated
file) stops with one line naming the file and the command that makes it, instead of a traceback
from deep inside transformers or safetensors (``HFValidationError`` about a repo id, a
deserialization error), and before it writes anything.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cpet.errors import CpetError
from cpet.io import visible_files

BASE = Path("models") / "base"


def compressed(method: str) -> Path:
    return Path("models") / "compressed" / method


def bundle(method: str, task: str, variant: str) -> Path:
    """A trained variant's bundle (adapter + recovery modules): ``models/recover/<m>/<task>/<variant>``."""
    return Path("models") / "recover" / method / task / variant


def teacher(task: str) -> Path:
    return Path("models") / "teacher" / task


def teacher_adapter(task: str) -> Path:
    return teacher(task) / "adapter"


def teacher_cache(task: str) -> Path:
    return teacher(task) / "cache.safetensors"


#: first two path parts -> (stage, fan-out option); the third part is the item
_MADE_BY = {
    ("models", "base"): ("fetch", None),
    ("data", "processed"): ("fetch", None),
    ("reports", "validation"): ("validate", None),
    ("models", "compressed"): ("compress", "method"),
    ("models", "teacher"): ("teacher", "task"),
    ("models", "inherit"): ("inherit", "method"),
    ("models", "recover"): ("recover", "method"),
    ("models", "onnx"): ("export", "method"),
}


def made_by(rel: Path) -> str:
    """The commands that make ``rel`` (``dvc repro <stage>@<item>`` / ``cpet <stage> --<opt> <item>``)."""
    parts = Path(rel).parts
    stage, option = _MADE_BY.get(tuple(parts[:2]), (None, None))
    if stage is None:
        return "the stage that makes it"
    if option and len(parts) > 2:
        return f"`dvc repro {stage}@{parts[2]}` (or `cpet {stage} --{option} {parts[2]}`)"
    return f"`dvc repro {stage}` (or `cpet {stage}`)"


def require(root: str | Path, rel: str | Path) -> Path:
    """``root / rel``, after checking it exists and its files are whole; else a one-line error."""
    path = Path(root) / rel
    if not path.exists():
        raise CpetError(f"{rel}: missing; it is made by {made_by(Path(rel))}")
    files = [path] if path.is_file() else visible_files(path)
    if not files:
        raise CpetError(f"{rel}: empty; it is made by {made_by(Path(rel))}")
    for f in files:
        problem = _damage(f)
        if problem:
            shown = Path(rel) / f.relative_to(path) if f != path else Path(rel)
            raise CpetError(f"{shown}: damaged ({problem}); remake it with {made_by(Path(rel))}")
    return path


def _damage(f: Path) -> str | None:
    """Why ``f`` is not a whole file of its kind, or None (safetensors, ONNX and JSON are checked)."""
    if f.suffix == ".safetensors":
        return _safetensors_damage(f)
    if f.suffix == ".json":
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"not valid JSON: {err}"
    if f.suffix == ".onnx":
        import onnx
        from google.protobuf.message import DecodeError

        try:
            onnx.load(str(f), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as err:
            return f"not a valid ONNX model: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def _safetensors_damage(f: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes; the
    file must end exactly where the last tensor does (a truncated copy does not)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"header of {n} bytes runs past the end of the {size}-byte file"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "header is not valid JSON"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, the header describes {expected}"
    return None
