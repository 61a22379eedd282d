"""One trainer for every variant: the model, its trainable set, the data, a loss function.

``loss_fn(model, batch) -> (loss, logs)`` decides what a step computes (plain task loss, or the
distillation loss reading the teacher cache); the loop owns everything else: data order,
AdamW + linear warmup/decay, clipping, validation, best-weights selection, resumable
checkpoints. It runs on ``accelerate.Accelerator``: single process by default, DDP under
``accelerate launch`` / ``torchrun`` (gloo on CPU); on the GPU unless ``cpet.env.device()`` is the CPU. Only the trainable set ever changes, so
pruning masks and quantization grids of the base stay intact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cpet.env import TORCH_GLOBALS, cuda_devices, device, use_bf16
from cpet.errors import CpetError
from cpet.train import checkpoint
from cpet.train.checkpoint import TrainState
from cpet.train.config import TrainConfig
from cpet.train.data import DataOrder, TokenizedExamples

#: A training run draws from torch's global RNG (dropout) under this lock (= cpet.env.TORCH_GLOBALS),
#: so runs that a thread pool starts side by side each get their own seed's stream.
RNG_LOCK = TORCH_GLOBALS

LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[nn.Module], float]


@dataclass
class TrainResult:
    steps: int
    best_metric: float | None
    best_step: int | None
    final_loss: float
    examples_per_s: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    bf16: bool = False  # mixed_precision as resolved on this device


def select_trainable(model: nn.Module, trainable: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """Freeze everything except ``trainable`` (parameter names; None = what requires grad now)."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if trainable is None else list(trainable)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise CpetError(f"trainable parameters not in the model: {unknown[:3]}")
    if not names:
        raise CpetError("nothing to train: the trainable set is empty")
    keep = set(names)
    for n, p in named.items():
        p.requires_grad_(n in keep)
    return {n: named[n] for n in named if n in keep}  # model order: stable optimizer state order


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


@contextmanager
def attention_kernel(model: nn.Module, impl: str | None) -> Iterator[None]:
    """Run ``model`` (or the transformers model inside a peft wrapper) with attention ``impl``
    (``eager``, ``sdpa``, ...) and restore its own afterwards; ``None`` changes nothing.

    Why: on CPU, torch's SDPA backward for short prompts costs ~19% of a LoRA step
    (SmolLM2-135M, 8 x ~35 tokens: 0.86 s sdpa vs 0.70 s eager per step); inference is equal.
    """
    if impl is None:
        yield
        return
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None:
        raise CpetError(f"attn_implementation {impl!r} needs a transformers model, got {type(model).__name__}")
    own = hf.config._attn_implementation
    hf.set_attn_implementation(impl)
    try:
        yield
    finally:
        hf.set_attn_implementation(own)


def _better(metric: float, best: float | None) -> bool:
    return best is None or metric > best


def train(model: nn.Module, data: TokenizedExamples, loss_fn: LossFn, config: TrainConfig, *,
          trainable: Iterable[str] | None = None, evaluate: EvalFn | None = None,
          checkpoint_dir: str | Path | None = None, checkpoint_key: str | None = None, accelerator=None,
          progress: bool = True) -> TrainResult:
    """Train ``model``'s trainable set in place; resume from ``checkpoint_dir`` when it holds one.

    The result's ``history`` has one entry per step: ``step``, ``lr``, ``loss`` and the loss
    function's logs (e.g. ``task``, ``mse``, ``kl``) and ``validation`` (None between evaluations).
    ``evaluate(model) -> metric`` (higher is better) runs on the main process every
    ``eval_every`` steps and at the end, under the same autocast as the training step; the best
    step's trainable weights are kept and, with ``restore_best``, loaded at the end. Without
    ``evaluate`` the last weights are kept. ``config.attn_implementation`` applies for the run.
    A checkpoint resumes only when it was written with the same ``checkpoint_key`` (what the
    caller hashed of its inputs) and recipe. The global torch RNG is used under :data:`RNG_LOCK`
    and restored afterwards.
    """
    with RNG_LOCK, torch.random.fork_rng(devices=cuda_devices()):
        return _train(model, data, loss_fn, config, trainable=trainable, evaluate=evaluate,
                      checkpoint_dir=checkpoint_dir, checkpoint_key=checkpoint_key,
                      accelerator=accelerator, progress=progress)


def _train(model, data, loss_fn, config, *, trainable, evaluate, checkpoint_dir, checkpoint_key,
           accelerator, progress) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    acc = accelerator or Accelerator(cpu=device().type == "cpu")  # CPET_DEVICE=cpu keeps a GPU box on CPU
    rank, world = acc.process_index, acc.num_processes
    params = select_trainable(model, trainable)
    torch.manual_seed(config.seed + rank)  # dropout stream per process; restored on resume
    wrapped = acc.prepare_model(model)  # DDP when launched distributed; moves to the device
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(config.warmup_steps, config.steps))
    meta = {"config": config.model_dump(), "world_size": world, "parameters": list(params), "key": checkpoint_key}
    state, best = TrainState(), None

    loaded = checkpoint.load(checkpoint_dir) if checkpoint_dir is not None else None
    if loaded is not None:
        _check_compatible(loaded.meta, meta, checkpoint_dir)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(loaded.params[n])
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        checkpoint.set_rng_state(loaded.rng[rank])
        state, best = loaded.state, loaded.best
    resumed_from = state.step

    order = DataOrder(len(data), config.seed)
    clip = [p for p in params.values()]
    bar = tqdm(total=config.steps, initial=state.step, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True)
    t0, seen, loss_value = time.perf_counter(), 0, math.nan

    bf16 = use_bf16(config.mixed_precision, acc.device)

    def autocast():
        return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16)

    with attention_kernel(model, config.attn_implementation):
        while state.step < config.steps:
            rows = order.step_rows(state.step, config.batch_size, rank, world)
            batch = {k: v.to(acc.device) for k, v in data.batch(rows).items()}
            wrapped.train()
            with autocast():
                loss, logs = loss_fn(wrapped, batch)
            acc.backward(loss)
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(clip, config.max_grad_norm)  # DDP grads are already averaged
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.data_position = state.step * world * config.batch_size
            seen += len(rows) * world
            loss_value = float(loss.detach())
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_value:.4f}", ex_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            # the same keys every step (DVC plots need that): validation is null between evaluations
            state.history.append({"step": state.step, "lr": lr, "loss": loss_value, **logs, "validation": None})

            last = state.step == config.steps
            if evaluate is not None and (last or (config.eval_every and state.step % config.eval_every == 0)):
                with autocast():
                    metric = [evaluate(acc.unwrap_model(wrapped)) if acc.is_main_process else None]
                metric = broadcast_object_list(metric)[0] if world > 1 else metric[0]
                state.history[-1]["validation"] = metric
                if _better(metric, state.best_metric):
                    state.best_metric, state.best_step = metric, state.step
                    best = {n: p.detach().clone() for n, p in params.items()}
            due = last or (config.checkpoint_every and state.step % config.checkpoint_every == 0)
            if checkpoint_dir is not None and due:
                rngs = gather_object([checkpoint.rng_state()]) if world > 1 else [checkpoint.rng_state()]
                if acc.is_main_process:
                    checkpoint.save(checkpoint_dir, state=state, params=params, best=best, optimizer=optimizer,
                                    scheduler=scheduler, rng=rngs, meta=meta)
                acc.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - t0
    if config.restore_best and best is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best[n].to(p.device))
    return TrainResult(steps=state.step, best_metric=state.best_metric, best_step=state.best_step,
                       final_loss=loss_value, examples_per_s=seen / elapsed if seen else 0.0,
                       history=state.history, resumed_from=resumed_from, bf16=bf16)


def _check_compatible(old: dict, new: dict, where) -> None:
    """A checkpoint resumes only the same recipe (the schedule depends on steps) and trainable set."""
    keys = ("steps", "seed", "batch_size", "lr", "warmup_steps", "weight_decay", "max_length")
    diff = [k for k in keys if old["config"].get(k) != new["config"].get(k)]
    if old.get("key") != new["key"]:
        diff.append("input key (models, data, task or code)")
    if diff or old["world_size"] != new["world_size"] or old["parameters"] != new["parameters"]:
        what = diff or (["world_size"] if old["world_size"] != new["world_size"] else ["trainable parameters"])
        raise CpetError(f"{where}: checkpoint was written with a different {', '.join(what)}; "
                        "delete it or use another checkpoint_dir")
