"""Tasks as language-model classification: a prompt template and one label word per class.

The prediction is the label whose word's first token gets the highest next-token logit after the
prompt. Works for any causal LM: only ``model(input_ids, attention_mask).logits`` is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpet.errors import ConfigError


@dataclass(frozen=True)
class Verbalizer:
    labels: tuple[str, ...]
    token_ids: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, words: dict[str, str], where: str = "verbalizer") -> Verbalizer:
        """Map each label to the first token of its word; the tokens must be distinct."""
        ids = []
        for label, word in words.items():
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ConfigError(f"{where}.{label}: word {word!r} tokenizes to nothing")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{where}: label words must start with distinct tokens, got {ids}")
        return cls(tuple(words), tuple(ids))


def encode_prompts(tokenizer, texts: Sequence[str], template: str, max_length: int) -> dict:
    """Right-padded batch of prompts; texts are cut from the left of the template's slot.

    Truncation keeps the end of the prompt (where the label word follows): the text is shortened
    so that the whole prompt fits ``max_length`` tokens.
    """
    prompts = [template.format(text=t) for t in texts]
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for ids, text in zip(enc, texts, strict=True):
        if len(ids) > max_length:
            over = len(ids) - max_length
            t_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            short = tokenizer.decode(t_ids[: max(1, len(t_ids) - over - 2)])
            ids = tokenizer(template.format(text=short), add_special_tokens=False)["input_ids"]
            ids = ids[-max_length:]
        out.append(ids)
    width = max(len(i) for i in out)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(out), width), pad, dtype=torch.long)
    mask = torch.zeros((len(out), width), dtype=torch.long)
    for row, ids in enumerate(out):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def last_token_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real (right-padded) position: ``[batch, vocab]``."""
    last = attention_mask.sum(dim=1) - 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def label_position_logits(model, batch: dict) -> torch.Tensor:
    """Next-token logits at each row's last real position, ``[batch, vocab]``.

    Asks the model for logits at only the (few distinct) last positions of the batch
    (``logits_to_keep``, supported by current HF causal LMs): the vocabulary projection of a
    49k-token vocabulary over every position would otherwise cost ~20% of the forward pass.
    """
    last = batch["attention_mask"].sum(dim=1) - 1
    keep, where = torch.unique(last, return_inverse=True)
    try:
        logits = model(**batch, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep
        return last_token_logits(model(**batch).logits, batch["attention_mask"])
    return logits[torch.arange(logits.shape[0], device=logits.device), where]


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], template: str, verbalizer: Verbalizer,
            *, max_length: int, batch_size: int = 16) -> tuple[list[int], torch.Tensor]:
    """Predicted class index per text and the label-word scores ``[n, n_labels]``."""
    was_training = model.training
    model.eval()
    scores = []
    ids = torch.tensor(verbalizer.token_ids)
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = encode_prompts(tokenizer, texts[start : start + batch_size], template, max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores.append(label_position_logits(model, batch)[:, ids.to(device)].float().cpu())
    model.train(was_training)
    s = torch.cat(scores) if scores else torch.zeros((0, len(ids)))
    return s.argmax(dim=1).tolist(), s


def accuracy_f1(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (classes absent from both gold and pred count as F1 = 0 only if
    present in gold; a class never in gold nor predicted is skipped)."""
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else 0.0
    f1s = []
    for c in range(n_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}
