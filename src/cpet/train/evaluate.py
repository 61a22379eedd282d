"""A validation callback for ``train``: pre-tokenized, length-sorted batches, one metric."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cpet.lmcls import Verbalizer, accuracy_f1
from cpet.train.data import pad_batch, tokenize_prompts


class Evaluator:
    """``Evaluator(...)(model) -> metric``: accuracy or macro-F1 of the label-score argmax.

    Texts are tokenized once (as ``lmcls.encode_prompts`` does) and batched by length; logits are
    computed only where labels are scored (``lmcls.label_scores``: the last positions for
    first-token scoring, the word positions for sum/mean), so validation adds little to a run.
    """

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[int], template: str,
                 verbalizer: Verbalizer, *, max_length: int, batch_size: int = 32, metric: str = "accuracy") -> None:
        if metric not in ("accuracy", "macro_f1"):
            raise ValueError(f"metric must be accuracy or macro_f1, got {metric!r}")
        self.seqs = tokenize_prompts(tokenizer, texts, template, max_length)
        self.labels = list(labels)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.verbalizer = verbalizer
        self.order = sorted(range(len(self.seqs)), key=lambda i: len(self.seqs[i]))
        self.batch_size, self.metric = batch_size, metric

    @torch.no_grad()
    def scores(self, model: nn.Module) -> torch.Tensor:
        """Label scores ``[n, n_labels]`` in the original order."""
        from cpet.distill import lm_forward

        was = model.training
        model.eval()
        device = next(model.parameters()).device
        out = torch.zeros(len(self.seqs), len(self.verbalizer.labels))
        for start in range(0, len(self.order), self.batch_size):
            rows = self.order[start : start + self.batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([self.seqs[i] for i in rows], self.pad).items()}
            out[rows] = lm_forward(model, batch, self.verbalizer).label_logits.cpu()
        model.train(was)
        return out

    def __call__(self, model: nn.Module) -> float:
        pred = self.scores(model).argmax(1).tolist()
        return accuracy_f1(self.labels, pred, len(self.verbalizer.labels))[self.metric]
