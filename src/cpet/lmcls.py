"""Tasks as language-model classification: a prompt template and one label word per class.

A label word may be several tokens. A verbalizer's ``scoring`` says how a label is scored after
the prompt:

- ``first-token``: the next-token logit of the word's first token (one forward pass over the
  prompts; exact when every word is one token, an approximation otherwise);
- ``sum``: the log-probability of the whole word, ``sum_j log p(w_j | prompt, w_<j)``;
- ``mean``: that sum divided by the word's token count (length-normalised).

``auto`` resolves to ``first-token`` when every word is one token (the scores are then exact and
cost one pass) and to :data:`MULTI_TOKEN_DEFAULT` otherwise (chosen by measurement: ``docs/labels.md``).
``sum``/``mean`` run one pass over the batch expanded to one row per (prompt, label), see
:func:`expand_labels`. Every caller reads ``[batch, n_labels]`` scores from :func:`label_scores`
(or :func:`scores_from_logits` on another runtime's logits) and treats them alike: cross-entropy,
tempered KL, argmax. Works for any causal LM: only ``model(input_ids, attention_mask).logits``
is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpet.errors import ConfigError

FIRST_TOKEN, SUM, MEAN, AUTO = "first-token", "sum", "mean", "auto"
SCORINGS = (AUTO, FIRST_TOKEN, SUM, MEAN)
#: what ``auto`` means when some word has several tokens. Measured zero-shot (docs/labels.md,
#: ``python -m cpet.labelbench``): sum and mean tie within noise (<= 2 points, 4 of 200 rows), so
#: sum, the word's actual log-probability, which the loss and KL then train on.
MULTI_TOKEN_DEFAULT = SUM


@dataclass(frozen=True)
class Verbalizer:
    """Labels, their words' token sequences and the resolved scoring (never ``auto``).

    ``token_ids`` are the words' first tokens (what ``first-token`` scoring reads);
    ``sequences`` the whole words' tokens (what ``sum`` / ``mean`` read).
    """

    labels: tuple[str, ...]
    token_ids: tuple[int, ...]
    sequences: tuple[tuple[int, ...], ...]
    scoring: str

    @classmethod
    def build(cls, tokenizer, words: dict[str, str], where: str = "verbalizer",
              scoring: str = AUTO) -> Verbalizer:
        """Tokenize each label's word (no special tokens) and resolve ``scoring``.

        Refused, one line naming ``where``: a word that tokenizes to nothing; ``first-token``
        scoring (asked for, or ``auto`` with one-token words) when two words start with the same
        token, since those labels would always tie; ``sum``/``mean`` when two words are the same
        token sequence. ``first-token`` on multi-token words is allowed only when asked for.
        """
        if scoring not in SCORINGS:
            raise ConfigError(f"{where}: scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
        seqs = []
        for label, word in words.items():
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ConfigError(f"{where}.{label}: word {word!r} tokenizes to nothing")
            seqs.append(tuple(int(t) for t in toks))
        multi = any(len(s) > 1 for s in seqs)
        resolved = (MULTI_TOKEN_DEFAULT if multi else FIRST_TOKEN) if scoring == AUTO else scoring
        firsts = [s[0] for s in seqs]
        if resolved == FIRST_TOKEN and len(set(firsts)) != len(firsts):
            raise ConfigError(f"{where}: label words must start with distinct tokens for first-token "
                              f"scoring, got {firsts}; use scoring sum or mean")
        if len(set(seqs)) != len(seqs):
            raise ConfigError(f"{where}: two label words are the same tokens {[list(s) for s in seqs]}")
        return cls(tuple(words), tuple(firsts), tuple(seqs), resolved)

    @property
    def first_token(self) -> bool:
        return self.scoring == FIRST_TOKEN

    def identity(self) -> dict:
        """What decides this verbalizer's scores (checkpoint keys, the teacher cache check):
        the scoring, the first tokens and the whole words' tokens."""
        return {"scoring": self.scoring, "label_token_ids": list(self.token_ids),
                "label_sequences": [list(s) for s in self.sequences]}


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
    return _at_last_positions(model, batch, ())[1]


def _at_last_positions(model, batch: dict, layers: Sequence[int]):
    """The model output (``logits`` at the batch's distinct last positions only) and the
    ``[batch, vocab]`` logits at each row's own last real position."""
    last = batch["attention_mask"].sum(dim=1) - 1
    keep, where = torch.unique(last, return_inverse=True)
    out = forward_at(model, batch, keep, layers)
    return out, out.logits[torch.arange(len(last), device=last.device), where]


@dataclass(frozen=True)
class LabelBatch:
    """A right-padded prompt batch expanded to one row per (prompt, label): row ``b * K + k`` is
    prompt ``b`` followed by label ``k``'s word tokens, right-padded (the layout cpet uses
    everywhere). Word token ``j`` of a row is predicted by the logits at ``positions[row, j]``
    (= prompt length - 1 + j); ``valid`` masks the positions past a shorter word."""

    input_ids: torch.Tensor  # [B*K, width + max word length]
    attention_mask: torch.Tensor
    positions: torch.Tensor  # [B*K, L] long
    targets: torch.Tensor  # [B*K, L] long
    valid: torch.Tensor  # [B*K, L] bool
    n_labels: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def expand_labels(batch: dict, verbalizer: Verbalizer) -> LabelBatch:
    """:class:`LabelBatch` of ``batch`` (``input_ids``/``attention_mask``, right-padded prompts).

    Pad tokens keep whatever id they have (masked out; under the causal mask with right padding no
    real position sees them), so each row's prompt positions compute what the prompt batch does.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dev = ids.device
    k = len(verbalizer.sequences)
    longest = max(len(s) for s in verbalizer.sequences)
    words = torch.zeros((k, longest), dtype=torch.long, device=dev)
    word_mask = torch.zeros((k, longest), dtype=torch.bool, device=dev)
    for i, seq in enumerate(verbalizer.sequences):
        words[i, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=dev)
        word_mask[i, : len(seq)] = True
    lengths = mask.long().sum(1).repeat_interleave(k)  # [B*K] prompt lengths
    rows = ids.shape[0] * k
    out_ids = torch.cat([ids.repeat_interleave(k, 0), ids.new_zeros((rows, longest))], 1)
    out_mask = torch.cat([mask.long().repeat_interleave(k, 0), mask.new_zeros((rows, longest), dtype=torch.long)], 1)
    targets, valid = words.repeat(ids.shape[0], 1), word_mask.repeat(ids.shape[0], 1)
    offsets = torch.arange(longest, device=dev)
    at = lengths[:, None] + offsets  # where each word token goes
    r = torch.arange(rows, device=dev)[:, None].expand_as(at)
    out_ids[r[valid], at[valid]] = targets[valid]
    out_mask[r[valid], at[valid]] = 1
    positions = torch.where(valid, at - 1, lengths[:, None] - 1)
    return LabelBatch(out_ids, out_mask, positions, targets, valid, k)


def scores_from_logits(logits: torch.Tensor, columns: torch.Tensor, labels: LabelBatch, scoring: str) -> torch.Tensor:
    """``[B, K]`` label scores from next-token ``logits`` ``[B*K, P, vocab]`` of the expanded
    batch, where ``columns[row, j]`` is the column of ``logits`` holding position
    ``labels.positions[row, j]`` (the identity for a full-sequence output).

    ``sum``: the word's summed token log-probabilities; ``mean``: divided by its token count.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(columns)
    picked = logits[rows, columns].float().log_softmax(-1)  # [B*K, L, vocab]: only the scored positions
    lp = picked.gather(-1, labels.targets.unsqueeze(-1)).squeeze(-1) * labels.valid
    total = lp.sum(1)
    if scoring == MEAN:
        total = total / labels.valid.sum(1)
    elif scoring != SUM:
        raise ValueError(f"scores_from_logits: scoring {scoring!r} is not sum or mean")
    return total.view(-1, labels.n_labels)


@dataclass
class LabelScores:
    scores: torch.Tensor  # [batch, n_labels], float32
    hidden: dict[int, torch.Tensor]  # layer -> [batch, seq, hidden] of the prompts; empty unless asked for


def forward_at(model, inputs: dict, keep: torch.Tensor, layers: Sequence[int]):
    """``model`` output whose ``logits`` hold the positions ``keep`` only (``logits_to_keep``, which
    current HF causal LMs support: the head over a 49k vocabulary at every position would cost ~20%
    of the pass); an architecture without it computes every position and is sliced after."""
    inputs = {**inputs, "output_hidden_states": bool(layers), "use_cache": False}
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:  # an architecture without logits_to_keep
        out = model(**inputs)
        out.logits = out.logits[:, keep]
        return out


def label_scores(model, batch: dict, verbalizer: Verbalizer, layers: Sequence[int] = ()) -> LabelScores:
    """One forward pass: each label's score after each prompt (+ the prompts' hidden states if asked).

    ``first-token``: the label tokens' logits at each row's last real token (the head runs at the
    distinct last positions only, ``logits_to_keep``). ``sum``/``mean``: one pass over
    :func:`expand_labels`' rows, the head only at the positions that predict word tokens; hidden
    states are those of each prompt's first label row over the prompt's width (under the causal
    mask they are the prompt's own). No KV cache is built.
    """
    mask = batch["attention_mask"]
    if verbalizer.first_token:
        out, logits = _at_last_positions(model, {"input_ids": batch["input_ids"], "attention_mask": mask}, layers)
        scores = logits[:, torch.tensor(verbalizer.token_ids, device=logits.device)].float()
        hidden = {l: out.hidden_states[l] for l in layers} if layers else {}
        return LabelScores(scores, hidden)
    labels = expand_labels(batch, verbalizer)
    keep = torch.unique(labels.positions)
    out = forward_at(model, labels.model_inputs(), keep, layers)
    scores = scores_from_logits(out.logits, torch.searchsorted(keep, labels.positions), labels, verbalizer.scoring)
    k, width = labels.n_labels, mask.shape[1]
    hidden = {l: out.hidden_states[l][::k, :width] for l in layers} if layers else {}
    return LabelScores(scores, hidden)


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], template: str, verbalizer: Verbalizer,
            *, max_length: int, batch_size: int = 16) -> tuple[list[int], torch.Tensor]:
    """Predicted class index per text and the label scores ``[n, n_labels]`` (:func:`label_scores`:
    label-token logits for first-token scoring, word log-probabilities for sum/mean)."""
    was_training = model.training
    model.eval()
    scores = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = encode_prompts(tokenizer, texts[start : start + batch_size], template, max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores.append(label_scores(model, batch, verbalizer).scores.cpu())
    model.train(was_training)
    s = torch.cat(scores) if scores else torch.zeros((0, len(verbalizer.labels)))
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
