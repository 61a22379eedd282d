"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG per process, progress.

Layout (written atomically, so a kill leaves the previous checkpoint intact)::

    <dir>/last/
      trainable.safetensors  current trainable parameters (by name)
      best.safetensors       trainable parameters at the best validation step (if any)
      optimizer.pt           optimizer.state_dict()   (tensors and numbers only: weights_only load)
      scheduler.pt           scheduler.state_dict()
      rng.pt                 torch CPU (+ CUDA) RNG state of every process, by rank
      state.json             step, data position, best so far, history, config, parameter names
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cpet.io import atomic_dir, write_json

LAST = "last"


@dataclass
class TrainState:
    """Progress that a resumed run continues from."""

    step: int = 0
    data_position: int = 0  # stream position of the next example (all processes together)
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in params.items()}


def save(path: str | Path, *, state: TrainState, params: dict[str, torch.Tensor],
         best: dict[str, torch.Tensor] | None, optimizer, scheduler, rng: list[dict], meta: dict) -> Path:
    """Write ``<path>/last`` in one atomic swap (call on the main process only)."""
    target = Path(path) / LAST
    with atomic_dir(target) as tmp:
        save_file(_tensors(params), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(_tensors(best), str(tmp / "best.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", {"state": asdict(state), **meta})
    return target


@dataclass
class Loaded:
    state: TrainState
    meta: dict
    params: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict
    scheduler: dict
    rng: list[dict]


def load(path: str | Path) -> Loaded | None:
    """The checkpoint under ``<path>/last``, or None when there is none."""
    d = Path(path) / LAST
    if not (d / "state.json").is_file():
        # a kill between atomic_dir's two renames leaves the previous checkpoint as .last.old.<pid>
        old = sorted(Path(path).glob(f".{LAST}.old.*"), key=lambda p: p.stat().st_mtime) if Path(path).is_dir() else []
        old = [o for o in old if (o / "state.json").is_file()]
        if not old:
            return None
        d = old[-1]
    raw = json.loads((d / "state.json").read_text())
    best = load_file(str(d / "best.safetensors")) if (d / "best.safetensors").is_file() else None
    return Loaded(
        state=TrainState(**raw.pop("state")),
        meta=raw,
        params=load_file(str(d / "trainable.safetensors")),
        best=best,
        optimizer=torch.load(d / "optimizer.pt", weights_only=True),
        scheduler=torch.load(d / "scheduler.pt", weights_only=True),
        rng=torch.load(d / "rng.pt", weights_only=True),
    )
