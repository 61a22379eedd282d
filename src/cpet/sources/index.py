"""Download one named archive file from a package index's simple API, running none of its code.

``pip download`` of an sdist prepares its metadata, i.e. runs the archive's build backend
(``setup.py``). Here the file URL is read from the index page (PEP 691 JSON, or the PEP 503 HTML
page where an index serves only that) and fetched as bytes with urllib; nothing is unpacked.
The indexes are pip's own settings (``PIP_INDEX_URL``/``PIP_EXTRA_INDEX_URL`` or pip config),
default ``https://pypi.org/simple/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from cpet.errors import DataError

PYPI = "https://pypi.org/simple/"
ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
TIMEOUT_S = 180  # per network read; a stalled index fails instead of hanging the stage


def _pip_settings() -> dict[str, str]:
    """``pip config list`` as {key: value} (it includes PIP_* environment variables as ``:env:.``)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, check=False,
                          text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    settings = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = value.strip().strip("'\"")
    return settings


def _setting(settings: dict[str, str], name: str) -> str | None:
    """pip's precedence: environment, then the ``download`` section, then ``global``."""
    for scope in (":env:", "download", "global"):
        if f"{scope}.{name}" in settings:
            return settings[f"{scope}.{name}"]
    return None


def index_urls() -> list[str]:
    """The index URL then any extra index URLs, as pip would use them."""
    env = os.environ
    if "PIP_INDEX_URL" in env and "PIP_EXTRA_INDEX_URL" in env:
        settings = {}  # both given: no need to ask pip
    else:
        settings = _pip_settings()
    main = env.get("PIP_INDEX_URL") or _setting(settings, "index-url") or PYPI
    extra = env.get("PIP_EXTRA_INDEX_URL", _setting(settings, "extra-index-url") or "")
    return [main, *extra.split()]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a" and (href := dict(attrs).get("href")):
            self.hrefs.append(href)


def _open(url: str, accept: str | None = None):
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file" and Path(urllib.request.url2pathname(parsed.path)).is_dir():
        url = urllib.parse.urljoin(url.rstrip("/") + "/", "index.html")  # a PEP 503 folder
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def file_urls(index: str, project: str) -> dict[str, str]:
    """{file name: absolute URL} from one index's page for ``project`` (a canonical name)."""
    page = urllib.parse.urljoin(index.rstrip("/") + "/", f"{project}/")
    with _open(page, ACCEPT) as resp:
        kind = resp.headers.get_content_type()
        body = resp.read()
        base = resp.geturl()
    if kind == "application/vnd.pypi.simple.v1+json":
        files = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
    else:
        links = _Links()
        links.feed(body.decode("utf-8", errors="replace"))
        files = [(urllib.parse.unquote(h.split("#")[0].rstrip("/").rsplit("/", 1)[-1]), h)
                 for h in links.hrefs]
    return {name: urllib.parse.urljoin(base, url) for name, url in files}


def locate(filename: str, project: str, indexes: list[str]) -> str:
    """URL of ``filename`` on the first index that lists it; DataError saying what each answered."""
    answers = []
    for index in indexes:
        try:
            urls = file_urls(index, project)
        except (OSError, ValueError, KeyError) as err:  # URLError is an OSError; bad JSON a ValueError
            answers.append(f"{index}: {getattr(err, 'reason', None) or err}")
            continue
        if filename in urls:
            return urls[filename]
        answers.append(f"{index}: not listed")
    raise DataError(f"{filename}: not found on any package index ({'; '.join(answers)})")


def download(url: str, dest: Path, sha256: str) -> Path:
    """Stream ``url`` to ``dest`` (atomically) if its bytes hash to ``sha256``; else DataError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _open(url) as resp:
            while block := resp.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise DataError(f"{dest.name}: downloaded sha256 {digest.hexdigest()} != pinned {sha256} "
                            f"(from {url}); nothing kept")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as err:  # urllib's URLError/HTTPError, a timeout, a full disk
        why = getattr(err, "reason", None) or err
        raise DataError(f"{dest.name}: download from {url} failed: {why}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
