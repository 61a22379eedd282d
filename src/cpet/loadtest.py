"""``cpet load-test``: a bounded load test of a running ``cpet serve`` on loopback.

N client threads send a fixed, seeded list of requests: good ones (one task, or a batch mixing
tasks) and malformed ones (bad JSON, unknown task, empty text, wrong types, unknown keys). Every
good request must come back 200 with, per text, the label a direct in-process prediction gives;
every bad one a 4xx; and ``/health`` must still answer afterwards. The report (JSON) has p50/p99
latency and requests per second.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

from cpet.errors import ConfigError, CpetError

#: malformed bodies: (kind, body bytes); each must get a 4xx and leave the server serving
BAD_BODIES = {
    "bad json": b'{"task": "TASK", "texts": ["unterminated',
    "unknown task": b'{"task": "no-such-task", "texts": ["fine words"]}',
    "empty text": b'{"task": "TASK", "texts": ["   "]}',
    "no texts": b'{"task": "TASK", "texts": []}',
    "texts not a list": b'{"task": "TASK", "texts": "a bare string"}',
    "text not a string": b'{"items": [{"task": "TASK", "text": 42}]}',
    "unknown key": b'{"task": "TASK", "texts": ["fine"], "temperature": 2}',
    "not an object": b'["TASK", "fine"]',
}


@dataclass
class Case:
    kind: str  # "good" or a BAD_BODIES key
    body: bytes
    items: list[tuple[str, str]] = field(default_factory=list)  # (task, text) of a good request


@dataclass
class Outcome:
    case: Case
    status: int
    reply: dict | None
    ms: float
    error: str | None = None


def plan(texts: dict[str, list[str]], requests: int, *, bad_fraction: float, max_texts: int,
         seed: int) -> list[Case]:
    """``requests`` cases in a seeded order: about ``bad_fraction`` malformed, the rest good (half
    one task with 1..max_texts texts, half a batch mixing tasks)."""
    rng = random.Random(seed)
    tasks = sorted(texts)
    cases = []
    for i in range(requests):
        if rng.random() < bad_fraction:
            kind = rng.choice(sorted(BAD_BODIES))
            cases.append(Case(kind, BAD_BODIES[kind].replace(b"TASK", tasks[i % len(tasks)].encode())))
            continue
        n = rng.randint(1, max_texts)
        if rng.random() < 0.5:
            task = rng.choice(tasks)
            items = [(task, rng.choice(texts[task])) for _ in range(n)]
            body = {"task": task, "texts": [t for _, t in items]}
        else:
            items = [(task, rng.choice(texts[task])) for task in rng.choices(tasks, k=n)]
            body = {"items": [{"task": t, "text": x} for t, x in items]}
        cases.append(Case("good", json.dumps(body).encode(), items))
    return cases


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; ConfigError unless it is http(s) on a loopback address."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ConfigError(f"--url {url!r}: load tests run only against a server on loopback "
                          "(http://127.0.0.1:<port>)")
    return url.rstrip("/")


def fire(url: str, cases: list[Case], *, clients: int, timeout: float) -> tuple[list[Outcome], float]:
    """Send every case from ``clients`` threads (one HTTP connection each); (outcomes, seconds)."""
    import httpx

    local = threading.local()

    def send(case: Case) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout)
        t0 = time.perf_counter()
        try:
            r = local.client.post(f"{url}/predict", content=case.body,
                                  headers={"content-type": "application/json"})
        except httpx.HTTPError as err:
            return Outcome(case, 0, None, (time.perf_counter() - t0) * 1000, f"{type(err).__name__}: {err}")
        ms = (time.perf_counter() - t0) * 1000
        try:
            reply = r.json()
        except ValueError:
            reply = None
        return Outcome(case, r.status_code, reply, ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(pool.map(send, cases))
    return outcomes, time.perf_counter() - t0


def problems(outcomes: list[Outcome], expected: dict[tuple[str, str], str]) -> list[str]:
    """One line per request that was not answered as it should have been."""
    out = []
    for i, o in enumerate(outcomes):
        where = f"request {i} ({o.case.kind})"
        if o.error:
            out.append(f"{where}: {o.error}")
        elif o.case.kind != "good":
            if not 400 <= o.status < 500:
                out.append(f"{where}: status {o.status}, expected 4xx")
        elif o.status != 200:
            out.append(f"{where}: status {o.status}: {(o.reply or {}).get('detail')}")
        else:
            got = [(r.get("task"), r.get("label")) for r in o.reply.get("results", [])]
            want = [(task, expected[(task, text)]) for task, text in o.case.items]
            if got != want:
                out.append(f"{where}: labels {got} != in-process {want}")
    return out


def load_test(url: str, texts: dict[str, list[str]], expected: dict[tuple[str, str], str], *,
              clients: int, requests: int, bad_fraction: float, max_texts: int, seed: int = 0,
              timeout: float = 60) -> dict:
    """Run the load test; the report says ``ok`` and lists up to 10 ``failures``."""
    import httpx
    import numpy as np

    if clients < 1 or requests < 1 or not 0 <= bad_fraction <= 1 or max_texts < 1:
        raise ConfigError(f"load test: need clients >= 1, requests >= 1, 0 <= bad_fraction <= 1, "
                          f"max_texts >= 1 (got {clients}, {requests}, {bad_fraction}, {max_texts})")
    url = check_loopback(url)
    cases = plan(texts, requests, bad_fraction=bad_fraction, max_texts=max_texts, seed=seed)
    outcomes, seconds = fire(url, cases, clients=clients, timeout=timeout)
    failed = problems(outcomes, expected)
    try:
        alive = httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        alive = False
    if not alive:
        failed.append("server did not answer /health after the load test")
    ms = [o.ms for o in outcomes]
    good = [o.ms for o in outcomes if o.case.kind == "good"]
    return {
        "ok": not failed,
        "url": url,
        "clients": clients,
        "requests": len(cases),
        "good_requests": len(good),
        "bad_requests": len(cases) - len(good),
        "texts": sum(len(c.items) for c in cases),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(cases) / seconds, 2),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1),
                       "p99": round(float(np.percentile(ms, 99)), 1)},
        "good_latency_ms": {"p50": round(float(np.percentile(good, 50)), 1),
                            "p99": round(float(np.percentile(good, 99)), 1)} if good else None,
        "server_alive": alive,
        "failures": failed[:10],
        "failure_count": len(failed),
    }


def task_texts(root: Path, tasks: list[str], per_task: int, max_chars: int) -> dict[str, list[str]]:
    """The first ``per_task`` texts of each task's prepared test split that the server accepts
    (at most ``max_chars``, i.e. ``serve.max_chars``)."""
    from cpet import data

    out = {}
    for t in tasks:
        fits = [r["text"] for r in data.load_split(root, t, "test") if 0 < len(r["text"]) <= max_chars]
        if not fits:
            raise CpetError(f"load test: task {t!r} has no test text of at most {max_chars} characters")
        out[t] = fits[:per_task]
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--url", help="the running server (default: http://127.0.0.1:<serve.port>)")
    parser.add_argument("--method", help="compression method it serves (default: the first of compress.methods)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task the server reports)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    parser.add_argument("--bad-fraction", type=float, default=0.25,
                        help="share of malformed requests (default 0.25)")
    parser.add_argument("--texts-per-task", type=int, default=32,
                        help="distinct test-split texts drawn from per task (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")


def command(params, root: Path, args) -> int:
    """``cpet load-test``: print the report as JSON; CpetError (exit 1) unless it is ok."""
    import httpx

    from cpet.serve import load_predictor

    url = check_loopback(args.url or f"http://127.0.0.1:{params.serve.port}")
    try:
        served = httpx.get(f"{url}/health", timeout=30).json()
    except (httpx.HTTPError, ValueError) as err:
        raise CpetError(f"{url}/health: no cpet serve answering there ({type(err).__name__})") from None
    tasks = args.tasks.split(",") if args.tasks else served["tasks"]
    method = args.method or served.get("compression") or next(iter(params.compress.methods))
    predictor = load_predictor(params, root, method, tasks)
    texts = task_texts(root, tasks, args.texts_per_task, params.serve.max_chars)
    items = sorted({(t, x) for t, xs in texts.items() for x in xs})
    expected = {item: r["label"] for item, r in zip(items, predictor(items), strict=True)}
    report = load_test(url, texts, expected, clients=args.clients, requests=args.requests,
                       bad_fraction=args.bad_fraction, max_texts=params.serve.max_texts, seed=args.seed)
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        raise CpetError(f"load test failed: {report['failure_count']} problems, first: {report['failures'][0]}")
    return 0
