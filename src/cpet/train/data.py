"""Pre-tokenized examples, padded batches and the deterministic, resumable data order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpet.errors import DataError
from cpet.lmcls import encode_prompts


@dataclass(frozen=True)
class Example:
    """One training example; ``index`` is its row in the teacher cache (position in the train split)."""

    text: str
    label: int
    index: int


def tokenize_prompts(tokenizer, texts: Sequence[str], template: str, max_length: int,
                     chunk: int = 256) -> list[list[int]]:
    """Token ids per prompt, exactly as ``lmcls.encode_prompts`` builds them (without padding)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        enc = encode_prompts(tokenizer, texts[start : start + chunk], template, max_length)
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
            out.append(ids[: int(mask.sum())].tolist())
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (the layout ``lmcls`` uses)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TokenizedExamples:
    """Examples tokenized once; ``batch(rows)`` only pads."""

    ids: list[list[int]]
    labels: list[int]
    indices: list[int]
    pad_id: int

    @classmethod
    def build(cls, tokenizer, examples: Sequence[Example], template: str, max_length: int) -> TokenizedExamples:
        if not examples:
            raise DataError("no training examples")
        ids = tokenize_prompts(tokenizer, [e.text for e in examples], template, max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(ids, [e.label for e in examples], [e.index for e in examples], pad)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded batch with ``labels`` (class index) and ``index`` (teacher-cache row)."""
        out = pad_batch([self.ids[r] for r in rows], self.pad_id)
        out["labels"] = torch.tensor([self.labels[r] for r in rows], dtype=torch.long)
        out["index"] = torch.tensor([self.indices[r] for r in rows], dtype=torch.long)
        return out


class DataOrder:
    """An endless stream of example rows: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Step ``s`` of a run with ``P`` processes and per-process batch ``B`` uses stream positions
    ``[s*P*B, (s+1)*P*B)``; process ``r`` takes its ``r``-th block of ``B``. The stream is a pure
    function of the position, so resuming needs only the step.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def rows(self, start: int, count: int) -> list[int]:
        return [self._permutation(p // self.n)[p % self.n] for p in range(start, start + count)]

    def step_rows(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        return self.rows((step * world + rank) * batch_size, batch_size)
