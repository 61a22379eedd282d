"""Calibration passes: run the caller's batches and hand layer inputs to callbacks.

Callbacks get ``fn(name, x)`` with ``x`` a float32 ``[tokens, features]`` matrix of the real
(non-padding) tokens of one batch. :func:`run` is one pass through the whole model;
:func:`blockwise` replays cached inputs through one decoder block at a time, so statistics of
block ``i`` see the already-compressed blocks ``< i`` (the GPTQ/Wanda "sequential" scheme) at
the cost of about one forward pass in total.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

Hook = Callable[[str, torch.Tensor], None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


class TokenFilter:
    """Selects the non-padding rows of a flattened activation of the current batch."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        if self.mask is not None and x.shape[0] == self.mask.numel():
            x = x[self.mask]
        return x.detach().float()


def batches(calib: list[dict], device: torch.device) -> Iterator[tuple[dict, torch.Tensor | None]]:
    """Model kwargs and the flattened bool token mask (None: no padding) of each batch."""
    for b in calib:
        ids = b["input_ids"]
        ids = ids[None] if ids.dim() == 1 else ids
        mask = b.get("attention_mask")
        kwargs = {"input_ids": ids.to(device)}
        if mask is not None:
            mask = (mask[None] if mask.dim() == 1 else mask).to(device)
            kwargs["attention_mask"] = mask
        yield kwargs, (mask.reshape(-1).bool() if mask is not None else None)


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Hook, tokens: TokenFilter) -> Iterator[None]:
    """While active, every call of ``modules[name]`` reports its input rows to ``fn(name, x)``."""

    def make(name: str):
        def hook(mod, args) -> None:  # returns None: a pre-hook's return value would replace the inputs
            fn(name, tokens.rows(args[0]))

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run(model: nn.Module, calib: list[dict], modules: dict[str, nn.Module], fn: Hook) -> None:
    """One pass over ``calib`` reporting the inputs of ``modules`` to ``fn``."""
    tokens = TokenFilter()
    with input_hooks(modules, fn, tokens):
        for kwargs, mask in batches(calib, _device(model)):
            tokens.mask = mask
            model(**kwargs, use_cache=False)


@torch.no_grad()
def run_with_tokens(model: nn.Module, calib: list[dict], tokens: TokenFilter) -> None:
    """One plain pass; ``tokens.mask`` follows the batches (for modules with their own hooks)."""
    for kwargs, mask in batches(calib, _device(model)):
        tokens.mask = mask
        model(**kwargs, use_cache=False)


Replay = Callable[[dict[str, nn.Module], Hook], None]


@torch.no_grad()
def blockwise(
    model: nn.Module, calib: list[dict], blocks: nn.ModuleList, on_block: Callable[[int, nn.Module, Replay], None]
) -> None:
    """Call ``on_block(i, block, replay)`` for each block in order, then advance the cached inputs.

    ``replay(modules, fn)`` runs block ``i`` over every calibration batch with input hooks;
    ``on_block`` typically collects statistics this way and then compresses the block. The
    next block's inputs are computed with block ``i`` as ``on_block`` left it.
    """
    tokens = TokenFilter()
    cache: list[list] = []

    def grab(mod, args, kwargs):
        cache.append([args, kwargs, tokens.mask])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for kwargs, mask in batches(calib, _device(model)):
            tokens.mask = mask
            with contextlib.suppress(_Stop):
                model(**kwargs, use_cache=False)
    finally:
        handle.remove()

    for i, block in enumerate(blocks):

        def replay(modules: dict[str, nn.Module], fn: Hook, block=block) -> None:
            with input_hooks(modules, fn, tokens):
                for args, kwargs, mask in cache:
                    tokens.mask = mask
                    block(*args, **kwargs)

        on_block(i, block, replay)
        if i + 1 == len(blocks):
            break
        for entry in cache:
            args, kwargs, _ = entry
            out = block(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if args:
                entry[0] = (out, *args[1:])
            else:
                entry[1] = {**kwargs, "hidden_states": out}


def sequential_stats(
    model: nn.Module,
    calib: list[dict],
    targets: dict[str, nn.Module],
    new: Callable[[nn.Module], object],
    add: Callable[[object, torch.Tensor], None],
    process: Callable[[str, nn.Module, object], None],
) -> None:
    """Accumulate a statistic of each target's inputs block by block, then ``process`` it.

    Targets inside decoder block ``i`` are processed before block ``i + 1`` is calibrated, so
    later statistics see earlier compression; targets outside any block get a final full pass.
    """
    from cpet.compress.arch import decoder_blocks

    blocks = decoder_blocks(model)
    groups: dict[int | None, dict[str, nn.Module]] = {}
    prefix = next((n for n, m in model.named_modules() if m is blocks), None) if blocks is not None else None
    for name, mod in targets.items():
        idx = None
        if prefix is not None and name.startswith(prefix + "."):
            idx = int(name[len(prefix) + 1 :].split(".", 1)[0])
        groups.setdefault(idx, {})[name] = mod

    def handle(mods: dict[str, nn.Module], feed: Callable[[dict[str, nn.Module], Hook], None]) -> None:
        states = {n: new(m) for n, m in mods.items()}
        feed(mods, lambda n, x: add(states[n], x))
        for n, m in mods.items():
            process(n, m, states[n])

    if blocks is not None and any(k is not None for k in groups):
        blockwise(model, calib, blocks, lambda i, block, replay: groups.get(i) and handle(groups[i], replay))
    if groups.get(None):
        handle(groups[None], lambda mods, fn: run(model, calib, mods, fn))
