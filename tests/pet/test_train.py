"""The shared trainer: frozen base, best-on-validation, exact resume, reproducibility, DDP on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import tinypet as tiny
from cpet.distill import TaskLoss
from cpet.errors import CpetError
from cpet.lmcls import accuracy_f1, predict
from cpet.pet import attach_lora, attach_recovery
from cpet.train import DataOrder, Example, TokenizedExamples, train
from libsettings import lora_settings, recovery_settings, train_config


@pytest.fixture(scope="module")
def data(tok):
    texts, labels = tiny.texts_and_labels(24)
    return TokenizedExamples.build(tok, [Example(t, y, i) for i, (t, y) in enumerate(zip(texts, labels))],
                                   tiny.TEMPLATE, 32)


def _masked_base(seed=0):
    """A 'pruned' base: half of every linear weight zeroed (the mask a pruning method keeps)."""
    m = tiny.model(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] != tiny.config().vocab_size:
                mod.weight.mul_((torch.arange(mod.weight.numel()) % 2).view_as(mod.weight))
    return m


def _student(adapter_seed=0, dropout=0.1):
    m = attach_recovery(_masked_base(), recovery_settings(rank=2))
    torch.manual_seed(adapter_seed)
    return attach_lora(m, lora_settings(rank=4, dropout=dropout))


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, eval_every=2, checkpoint_every=2, seed=3,
                max_length=32, restore_best=False)
    return train_config(**{**base, **kw})


def _accuracy(tok, verbalizer):
    texts, labels = tiny.texts_and_labels(12, seed=7)

    def evaluate(model):
        pred, _ = predict(model, tok, texts, tiny.TEMPLATE, verbalizer, max_length=32)
        return accuracy_f1(labels, pred, 2)["accuracy"]
    return evaluate


def test_learns_and_base_weights_stay_frozen(data, verbalizer, tok):
    model = _student()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    zeros = {n: p == 0 for n, p in frozen.items() if "base_layer.weight" in n}
    losses = []
    loss_fn = TaskLoss(verbalizer)

    def recording(m, b):
        loss, logs = loss_fn(m, b)
        losses.append(float(loss.detach()))
        return loss, logs
    res = train(model, data, recording, _cfg(steps=30, eval_every=0, checkpoint_every=0, lr=1e-2), progress=False)
    assert res.steps == 30 and res.examples_per_s > 0
    assert sum(losses[-5:]) < sum(losses[:5])
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all((after[n][z] == 0).all() for n, z in zeros.items())  # the pruning mask is intact


def test_bf16_mixed_precision_learns_with_float32_weights(data, verbalizer):
    model = _student(dropout=0.0)
    dtypes, losses = set(), []
    loss_fn = TaskLoss(verbalizer)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: dtypes.add(
        torch.get_autocast_dtype(o.device.type) if torch.is_autocast_enabled(o.device.type) else o.dtype))

    def recording(m, b):
        loss, logs = loss_fn(m, b)
        losses.append(float(loss.detach()))
        return loss, logs
    train(model, data, recording, _cfg(steps=30, eval_every=0, checkpoint_every=0, lr=1e-2, mixed_precision="bf16"),
          progress=False)
    hook.remove()
    assert dtypes == {torch.bfloat16}  # every training forward ran under bf16 autocast
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_validation_runs_under_the_training_autocast(data, verbalizer):
    model = _student(dropout=0.0)
    seen = []

    def evaluate(m):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return 0.0
    train(model, data, TaskLoss(verbalizer), _cfg(steps=2, eval_every=1, checkpoint_every=0, mixed_precision="bf16"),
          evaluate=evaluate, progress=False)
    assert seen == [True, True]


def test_attention_kernel_is_used_while_training_and_restored_after(data, verbalizer):
    sdpa, eager = _student(dropout=0.0), _student(dropout=0.0)
    own = sdpa.get_base_model().config._attn_implementation
    assert own != "eager"  # tiny models load with sdpa, like real ones
    kernels, losses = [], {}
    loss_fn = TaskLoss(verbalizer)

    def recording(m, b):
        kernels.append(m.get_base_model().config._attn_implementation)
        loss, logs = loss_fn(m, b)
        losses.setdefault(kernels[-1], float(loss.detach()))
        return loss, logs
    train(sdpa, data, recording, _cfg(steps=2, eval_every=0, checkpoint_every=0), progress=False)
    train(eager, data, recording, _cfg(steps=2, eval_every=0, checkpoint_every=0, attn_implementation="eager"),
          progress=False)
    assert kernels == [own, own, "eager", "eager"]
    assert losses["eager"] == pytest.approx(losses[own], rel=1e-5)  # same model, same first batch
    assert eager.get_base_model().config._attn_implementation == own


def test_attention_kernel_needs_a_transformers_model(data, verbalizer):
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(CpetError, match="attn_implementation 'eager' needs a transformers model"):
        train(Bare(), data, lambda m, b: (m.w.sum(), {}), _cfg(attn_implementation="eager"), progress=False)


def test_interrupted_run_resumes_to_identical_weights(tmp_path, data, verbalizer, tok):
    loss_fn, evaluate = TaskLoss(verbalizer), _accuracy(tok, verbalizer)
    full = _student()
    ref = train(full, data, loss_fn, _cfg(), evaluate=evaluate, checkpoint_dir=tmp_path / "a", progress=False)

    calls = []

    def dies_in_step_4(m, b):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss_fn(m, b)
    with pytest.raises(KeyboardInterrupt):
        train(_student(), data, dies_in_step_4, _cfg(), evaluate=evaluate, checkpoint_dir=tmp_path / "b",
              progress=False)
    resumed = _student(adapter_seed=99)  # adapter init is overwritten from the step-2 checkpoint
    res = train(resumed, data, loss_fn, _cfg(), evaluate=evaluate, checkpoint_dir=tmp_path / "b", progress=False)
    assert res.resumed_from == 2 and res.steps == 6
    a, b = _trainable(full), _trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.history == ref.history and (res.best_step, res.best_metric) == (ref.best_step, ref.best_metric)
    done = train(resumed, data, loss_fn, _cfg(), checkpoint_dir=tmp_path / "b", progress=False)
    assert done.resumed_from == 6  # a finished run is a no-op
    with pytest.raises(CpetError, match="different lr"):
        train(_student(), data, loss_fn, _cfg(lr=1e-3), checkpoint_dir=tmp_path / "b", progress=False)


def test_best_weights_are_chosen_on_validation(data, verbalizer):
    model = _student()
    scripted, snapshots = iter([0.2, 0.9, 0.5, 0.1]), []

    def evaluate(m):
        snapshots.append(_trainable(m))
        return next(scripted)
    res = train(model, data, TaskLoss(verbalizer), _cfg(steps=4, eval_every=1, checkpoint_every=0, restore_best=True),
                evaluate=evaluate, progress=False)
    assert (res.best_step, res.best_metric) == (2, 0.9)
    now = _trainable(model)
    assert all(torch.equal(now[k], snapshots[1][k]) for k in now)
    assert not all(torch.equal(now[k], snapshots[3][k]) for k in now)


def test_seeded_runs_are_reproducible(data, verbalizer):
    runs = []
    for seed in (3, 3, 4):
        m = _student()
        train(m, data, TaskLoss(verbalizer), _cfg(steps=3, seed=seed, eval_every=0, checkpoint_every=0),
              progress=False)
        runs.append(_trainable(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_explicit_trainable_set_freezes_the_rest(data, verbalizer):
    model = _student()
    lora_only = [n for n, p in model.named_parameters() if "lora_" in n]
    rec = {n: p.detach().clone() for n, p in model.named_parameters() if "rec_" in n}
    train(model, data, TaskLoss(verbalizer), _cfg(steps=2, eval_every=0, checkpoint_every=0), trainable=lora_only,
          progress=False)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) and not now[n].requires_grad for n, v in rec.items())
    with pytest.raises(CpetError, match="not in the model"):
        train(model, data, TaskLoss(verbalizer), _cfg(), trainable=["nope"], progress=False)


def test_data_order_is_a_pure_function_of_position():
    order = DataOrder(10, seed=1)
    assert sorted(order.rows(0, 10)) == list(range(10)) and sorted(order.rows(10, 10)) == list(range(10))
    assert order.rows(0, 10) != order.rows(10, 10)
    two = [DataOrder(10, 1).step_rows(3, 2, rank=r, world=2) for r in (0, 1)]
    assert two[0] + two[1] == DataOrder(10, 1).rows(12, 4)


def test_config_validates():
    with pytest.raises(ValidationError):
        train_config(stpes=3)
    with pytest.raises(ValidationError, match="warmup_steps"):
        train_config(steps=3, warmup_steps=5)


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["world"] == "2" and meta["distributed_type"].endswith("MULTI_CPU") and meta["steps"] == "4"
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("rec_B" in k and a[k].abs().sum() > 0 for k in a)  # it trained


def test_evaluator_matches_lmcls_predict(tok, verbalizer):
    from cpet.train import Evaluator

    texts, labels = tiny.texts_and_labels(10, seed=5)
    model = _student(dropout=0.0)
    tiny.randomize_adapters(model)
    ev = Evaluator(tok, texts, labels, tiny.TEMPLATE, verbalizer, max_length=32, batch_size=4)
    _, ref = predict(model, tok, texts, tiny.TEMPLATE, verbalizer, max_length=32)
    torch.testing.assert_close(ev.scores(model), ref, rtol=1e-5, atol=1e-5)
    assert ev(model) == accuracy_f1(labels, ref.argmax(1).tolist(), 2)["accuracy"]
