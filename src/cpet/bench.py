"""Timing and memory measurement for the benchmark: interleaved rounds, subprocess memory.

Timing: every model runs once per round, round after round, after ``warmup`` untimed rounds, so a
burst of load from another job on the machine lands on all models alike instead of on whichever
happened to run then; p50/p90 are over the rounds.

Memory: a fresh Python process builds one model (:func:`measure_memory`), then the peak resident
set is reset (Linux ``/proc/self/clear_refs``) so that construction transients (e.g. the float
training form a packed model is built from) are not counted, one forward pass runs, and the
peak (``VmHWM``) minus the process's resident set before building is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from cpet.errors import CpetError

#: a model under test: (input_ids, attention_mask) -> anything (its output is discarded)
Runner = Callable[[torch.Tensor, torch.Tensor], object]


def inputs(batch: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (fixed seed) and a full attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    return ids, torch.ones_like(ids)


@torch.no_grad()
def interleaved(runners: dict[str, Runner], ids: torch.Tensor, mask: torch.Tensor, *, warmup: int,
                repeats: int, sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """``{name: {"p50_ms", "p90_ms"}}`` over ``repeats`` interleaved rounds after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(warmup + repeats):
        for name, run in runners.items():
            sync()
            t0 = time.perf_counter()
            run(ids, mask)
            sync()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: {"p50_ms": statistics.median(ts), "p90_ms": float(np.percentile(ts, 90))}
            for name, ts in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): building a packed model frees the float copy
    it came from, but glibc keeps large freed blocks in its heap, so RSS would still count them."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_of(build: Callable[[], Runner], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """In *this* process: MB resident for the built model, and peak MB during one forward pass."""
    import gc

    base = _status_kb("VmRSS")
    run = build()
    gc.collect()
    release_free_memory()
    resident = _status_kb("VmRSS")
    exact = reset_peak()
    with torch.no_grad():
        run(ids, mask)
    peak = _status_kb("VmHWM") if exact else max(_status_kb("VmHWM"), resident)
    return {"model_mb": round((resident - base) / 1024, 1), "peak_mb": round((peak - base) / 1024, 1),
            "peak_excludes_construction": exact}


def memory_main(build: Callable[[dict], Runner], argv: list[str] | None = None) -> None:
    """The ``python -m <module> --memory '<spec json>'`` entry that :func:`measure_memory` runs:
    ``build(spec)`` makes the model, and :func:`memory_of` is printed as JSON. The spec also holds
    the input shape: ``batch``, ``seq_len``, ``vocab``."""
    import argparse

    from cpet.env import apply_quiet_defaults

    apply_quiet_defaults()
    parser = argparse.ArgumentParser(description="memory of one model in a fresh process (used by cpet bench)")
    parser.add_argument("--memory", required=True, help="the model's spec, as JSON")
    spec = json.loads(parser.parse_args(argv).memory)
    ids, mask = inputs(spec["batch"], spec["seq_len"], spec["vocab"])
    print(json.dumps(memory_of(lambda: build(spec), ids, mask)))


def measure_memory(module: str, spec: dict, timeout: float = 600) -> dict:
    """Run ``python -m <module> --memory '<spec json>'`` (its :func:`memory_main`) in a fresh process;
    its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    what = f"memory measurement of {spec.get('name', module)} (python -m {module})"
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--memory", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise CpetError(f"{what} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        tail = ([ln.strip() for ln in proc.stderr.splitlines() if ln.strip()] or ["(no stderr)"])[-1]
        raise CpetError(f"{what} failed with exit code {proc.returncode}: {tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise CpetError(f"{what} printed no JSON result on its last stdout line") from None
