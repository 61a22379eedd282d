"""cpet load-test: concurrent good and malformed requests against `cpet serve` on loopback.

The server is the one tests/test_serve.py starts (two tasks on one int8 base, a tiny bundle each).
"""

import json
from pathlib import Path

import pytest

from cpet.errors import ConfigError
from cpet.loadtest import check_loopback, load_test
from test_serve import server  # noqa: F401 - the fixture

CLIENTS, REQUESTS = 6, 120  # bounded: a few seconds on 2 CPU cores


def test_cli_load_test_agrees_with_in_process_predictions_and_catches_a_wrong_one(server, capsys):  # noqa: F811
    from cpet.cli import main

    url, root = server
    code = main(["--root", str(root), "--params", str(Path(root) / "params.yaml"), "load-test", "--url", url,
                 "--clients", str(CLIENTS), "--requests", str(REQUESTS), "--bad-fraction", "0.3"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, report["failures"]
    assert report["ok"] and report["server_alive"] and report["failures"] == []
    assert report["requests"] == REQUESTS and report["clients"] == CLIENTS
    assert 15 < report["bad_requests"] < 60 and report["good_requests"] + report["bad_requests"] == REQUESTS
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["requests_per_s"] > 0
    print(json.dumps({k: report[k] for k in ("requests", "clients", "seconds", "requests_per_s",
                                              "latency_ms", "good_latency_ms")}))

    # the check is real: expectations that disagree with the server are reported, not passed
    texts = {"tiny": ["good great movie 1"], "swapped": ["good great movie 1"]}
    wrong = {("tiny", "good great movie 1"): "no-such-label", ("swapped", "good great movie 1"): "pos"}
    report = load_test(url, texts, wrong, clients=2, requests=10, bad_fraction=0, max_texts=2)
    assert not report["ok"] and report["server_alive"]
    assert any("no-such-label" in f for f in report["failures"])


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1:1"])
def test_only_loopback_servers(url):
    with pytest.raises(ConfigError, match="loopback"):
        check_loopback(url)
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://[::1]:8000") == "http://[::1]:8000"
