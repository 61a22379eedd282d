"""Atomic writes: an artifact is either complete or absent, never half-written.

Files are written to a temporary sibling and renamed; directories are built in a temporary
sibling directory and swapped in with one rename, so a killed run leaves the previous
artifact (or nothing) behind and a rerun starts cleanly.

Under :func:`discard_writes` (the non-zero ranks of a distributed launch: they train in step with
rank 0, which alone writes the stage's outputs) every write here is dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


_DISCARD: contextvars.ContextVar[bool] = contextvars.ContextVar("cpet_io_discard", default=False)


@contextlib.contextmanager
def discard_writes() -> Iterator[None]:
    """Drop every write of this module inside the block: files are not written, ``atomic_dir``
    yields a scratch folder that is deleted afterwards, figures are closed unsaved."""
    token = _DISCARD.set(True)
    try:
        yield
    finally:
        _DISCARD.reset(token)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if _DISCARD.get():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _fsync_write(Path(tmp), data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if _DISCARD.get():
        scratch = Path(tempfile.mkdtemp(prefix=f"cpet-discard-{path.name}."))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """A matplotlib figure written atomically (temporary sibling, then rename) and closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if _DISCARD.get():
        plt.close(fig)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a file, memoized per (path, size, mtime) within the process."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def visible_files(folder: str | os.PathLike) -> list[Path]:
    """Files under ``folder``, sorted, without hidden ones (``.x.tmp`` leftovers of atomic writes)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def tree_hash(path: str | os.PathLike) -> str:
    """Content hash of a file, or of a folder: every file's relative path and sha256, sorted
    (hidden leftovers such as ``.x.tmp`` ignored)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in visible_files(path):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def code_hash(package: str = "cpet") -> str:
    """Hash of every source file of ``package``: a code change invalidates what the code made."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    root = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
