"""Task loss, distillation loss and the teacher cache on a tiny model."""

import copy

import pytest
import torch
from pydantic import ValidationError

import tinypet as tiny
from cpet.distill import (DistillLoss, TaskLoss, TeacherCache, build_teacher_cache, lm_forward,
                          teacher_outputs)
from cpet.errors import DataError
from cpet.lmcls import last_token_logits
from cpet.pet import attach_lora
from cpet.train import Example, TokenizedExamples
from libsettings import distill_config, lora_settings

LAYERS = [-1, 1]


@pytest.fixture(scope="module")
def teacher():
    pm = attach_lora(tiny.model(), lora_settings(rank=4, dropout=0.0))
    tiny.randomize_adapters(pm)
    return pm.eval()


@pytest.fixture(scope="module")
def data(tok):
    texts, labels = tiny.texts_and_labels(10)
    return texts, TokenizedExamples.build(tok, [Example(t, y, i) for i, (t, y) in enumerate(zip(texts, labels))],
                                          tiny.TEMPLATE, 32)


def test_label_logits_only_at_last_positions_match_full_forward(teacher, data, verbalizer):
    batch = data[1].batch(range(6))
    ids = torch.tensor(verbalizer.token_ids)
    full = last_token_logits(teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                             batch["attention_mask"])[:, ids]
    torch.testing.assert_close(lm_forward(teacher, batch, verbalizer).label_logits, full, rtol=1e-5, atol=1e-6)


def test_distill_terms_vanish_when_student_is_teacher(teacher, data, verbalizer):
    batch = data[1].batch(range(8))
    cfg = distill_config(alpha=1.0, beta=0.5, temperature=2.0, layers=LAYERS)
    loss, logs = DistillLoss(verbalizer, cfg, teacher=teacher)(teacher, batch)
    assert logs["mse"] == 0.0 and abs(logs["kl"]) < 1e-7
    task, _ = TaskLoss(verbalizer)(teacher, batch)
    torch.testing.assert_close(loss, task)
    cache = build_teacher_cache(teacher, tiny.tokenizer(), data[0], tiny.TEMPLATE, verbalizer, LAYERS, 32, 4)
    loss_c, logs_c = DistillLoss(verbalizer, cfg, cache=cache)(teacher, batch)
    assert logs_c["mse"] < 1e-6 and abs(logs_c["kl"]) < 1e-7  # fp16 hidden states
    torch.testing.assert_close(loss_c, task, rtol=0, atol=1e-5)


def test_cached_and_live_teacher_agree_and_cache_round_trips(tmp_path, teacher, data, verbalizer, tok):
    texts, ds = data
    cache = build_teacher_cache(teacher, tok, texts, tiny.TEMPLATE, verbalizer, LAYERS, 32, batch_size=3)
    cache.save(tmp_path / "t.safetensors")
    again = TeacherCache.load(tmp_path / "t.safetensors")
    assert again.meta == cache.meta and again.layers == LAYERS
    for name in ("offsets", "input_ids", "label_logits"):
        assert torch.equal(getattr(again, name), getattr(cache, name))
    assert all(torch.equal(again.hidden[l], cache.hidden[l]) for l in LAYERS)
    assert again.hidden[-1].dtype == torch.float16 and len(again) == len(texts)
    batch = ds.batch([7, 2, 9, 0])
    live = teacher_outputs(teacher, batch, verbalizer, LAYERS)
    cached = again.lookup(batch, LAYERS)
    torch.testing.assert_close(cached.label_logits, live.label_logits, rtol=1e-5, atol=1e-5)
    m = batch["attention_mask"].bool()
    for l in LAYERS:
        torch.testing.assert_close(cached.hidden[l][m], live.hidden[l][m], rtol=2e-3, atol=2e-3)
        assert not cached.hidden[l][~m].any()


def test_cache_refuses_other_tokens(teacher, verbalizer, tok, data):
    texts, _ = data
    cache = build_teacher_cache(teacher, tok, texts, "Review : {text} :", verbalizer, [-1], 32)
    with pytest.raises(DataError, match="does not hold this example"):
        DistillLoss(verbalizer, distill_config(), cache=cache)(teacher, data[1].batch([0, 1]))


def test_distill_loss_has_gradients_for_a_different_student(teacher, data, verbalizer):
    student = attach_lora(copy.deepcopy(tiny.model(seed=5)), lora_settings(rank=4, dropout=0.0))
    tiny.randomize_adapters(student, seed=9)
    loss, logs = DistillLoss(verbalizer, distill_config(alpha=0.5, beta=1.0, temperature=2.0), teacher=teacher)(
        student, data[1].batch(range(4)))
    assert logs["mse"] > 0 and logs["kl"] > 0
    loss.backward()
    assert all(p.grad is not None for n, p in student.named_parameters() if p.requires_grad)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_config_validates():
    with pytest.raises(ValidationError):
        distill_config(alpah=1.0)
    with pytest.raises(ValidationError):
        distill_config(layers=[-1, -1])
    with pytest.raises(ValidationError):
        distill_config(temperature=0)


MULTI = {"neg": "not good", "pos": "very good movie"}  # 2 and 3 tokens, scored whole


@pytest.fixture(scope="module")
def multi(tok):
    from cpet.lmcls import Verbalizer

    return Verbalizer.build(tok, MULTI, scoring="sum")


def test_losses_use_multi_token_scores_and_reach_lora(teacher, data, multi, tok):
    from cpet.lmcls import label_scores

    batch = data[1].batch(range(4))
    student = attach_lora(copy.deepcopy(tiny.model(seed=5)), lora_settings(rank=4, dropout=0.0))
    tiny.randomize_adapters(student, seed=9)
    scores = label_scores(student, batch, multi).scores
    task, logs = TaskLoss(multi)(student, batch)
    torch.testing.assert_close(task, torch.nn.functional.cross_entropy(scores, batch["labels"]))
    cfg = distill_config(alpha=0.5, beta=1.0, temperature=2.0)
    loss, logs = DistillLoss(multi, cfg, teacher=teacher)(student, batch)
    teacher_scores = label_scores(teacher, batch, multi).scores
    want_kl = torch.nn.functional.kl_div((scores / 2).log_softmax(-1), (teacher_scores / 2).log_softmax(-1),
                                         log_target=True, reduction="batchmean") * 4
    assert logs["kl"] == pytest.approx(float(want_kl.detach()), rel=1e-5) and logs["mse"] > 0
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_multi_token_hidden_states_are_the_prompts(teacher, data, multi, verbalizer):
    batch = data[1].batch(range(6))
    one = lm_forward(teacher, batch, verbalizer, LAYERS).hidden
    many = lm_forward(teacher, batch, multi, LAYERS).hidden
    m = batch["attention_mask"].bool()
    for l in LAYERS:
        torch.testing.assert_close(many[l][m], one[l][m], rtol=1e-5, atol=1e-5)


def test_cache_refuses_another_verbalizer(teacher, data, multi, verbalizer, tok):
    from cpet.errors import ConfigError
    from cpet.lmcls import Verbalizer

    texts, ds = data
    cache = build_teacher_cache(teacher, tok, texts, tiny.TEMPLATE, multi, [-1], 32)
    assert cache.meta["scoring"] == "sum" and cache.meta["label_sequences"] == [list(s) for s in multi.sequences]
    loss, logs = DistillLoss(multi, distill_config(), cache=cache)(teacher, ds.batch([0, 1]))
    assert abs(logs["kl"]) < 1e-6
    others = [Verbalizer.build(tok, {"neg": "not good", "pos": "very good plot"}, scoring="sum"),  # same first tokens
              Verbalizer.build(tok, MULTI, scoring="mean"), verbalizer]
    for other in others:
        with pytest.raises(ConfigError, match="teacher cache was built with another verbalizer"):
            DistillLoss(other, distill_config(), cache=cache)
    # a cache from before multi-token labels (no scoring, no sequences) still serves first-token scoring
    old = build_teacher_cache(teacher, tok, texts[:2], tiny.TEMPLATE, verbalizer, [-1], 32)
    old.meta = {k: v for k, v in old.meta.items() if k not in ("scoring", "label_sequences")}
    DistillLoss(verbalizer, distill_config(), cache=old)
    with pytest.raises(ConfigError, match="scoring"):
        DistillLoss(Verbalizer.build(tok, tiny.LABEL_WORDS, scoring="sum"), distill_config(), cache=old)
