"""ONNX graphs through optimum, and ONNX Runtime sessions that say which device really runs them.

The graph is optimum's ``text-generation`` export (no past key/values: classification needs one
forward pass) of the deployment form from :mod:`cpet.export.sidepath`; quantized layers trace
straight into ``MatMulNBits`` nodes (w8a8 layers into ``MatMulInteger``), so no graph rewrite is needed. The folder is what
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir, use_cache=False)`` loads.

**Lean head** (the default): classification reads the next-token logits at each row's last real
token only, so the graph gathers that hidden state *before* the LM head and outputs ``logits``
``[batch, 1, vocab]`` (model metadata ``cpet_logits = last_position``). At 64 tokens the head over
every position is ~21% of SmolLM2-135M's forward FLOPs; at one position it is ~0.4%. The full
vocabulary is kept (not only the label words): dropping the other columns would save that ~0.4%
but tie the graph to one task and lose the whole-vocabulary parity check.

**Full head** (``lean=False``): logits at every position, ``[batch, seq, vocab]``. A task whose
label words are scored as whole words (``sum``/``mean``, see :mod:`cpet.lmcls`) needs the logits at
every word token's position of the prompt + word rows, so its graph is exported this way;
:meth:`OnnxLM.position_logits` reads the scored positions from either graph.

Every ONNX Runtime session is built by :func:`session` from :func:`session_options`: the same
optimization level, threads and spinning for every variant's graph, so benchmark ratios compare
like with like.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from cpet.errors import CpetError

#: optimum's recommended minimum for Llama (ORT 1.31 runs opset <= 23)
OPSET = 18
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: model metadata key saying which positions the ``logits`` output holds (absent: every position)
LOGITS_META = "cpet_logits"
LAST_POSITION = "last_position"


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token ``[batch]``: ``attention_mask.sum(1) - 1`` for the
    right-padded batches cpet builds, and also right for left padding (the largest masked-in index)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).amax(dim=1)


@contextmanager
def last_position_head(model: torch.nn.Module):
    """While active, ``model``'s LM head (``get_output_embeddings()``) sees only the hidden state
    at each row's last real token: ``logits`` become ``[batch, 1, vocab]``. Hooks, not a wrapper
    module, so optimum still exports the model as its own architecture, and whatever the model
    does after the head (soft-capping, logit scale) still applies."""
    head = model.get_output_embeddings()
    if head is None:
        raise CpetError(f"export: {type(model).__name__} has no output embeddings (LM head) to make lean")
    state: dict[str, torch.Tensor] = {}
    # the tracer may pass inputs by position, in the order of the class's forward signature
    # (GPT-2: input_ids, past_key_values, attention_mask, ...)
    signature = inspect.signature(type(model).forward)

    def grab(_module, args, kwargs):
        mask = signature.bind_partial(model, *args, **kwargs).arguments.get("attention_mask")
        if mask is None:
            raise CpetError("export: the lean head needs the attention_mask input")
        state["last"] = last_real_position(mask)

    def gather(_module, args):
        hidden = args[0]
        index = state["last"].view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    hooks = [model.register_forward_pre_hook(grab, with_kwargs=True), head.register_forward_pre_hook(gather)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike, *, expect_nbits: int = 0,
                expect_int8: int = 0, lean: bool = True) -> dict:
    """Export ``model`` (a plain HF causal LM, deployment form) into ``out_dir``; returns graph facts.

    ``expect_nbits`` is the number of quantized layers: the graph must hold exactly that many
    MatMulNBits nodes (a layer silently exported as a float MatMul would be a wrong artifact);
    ``expect_int8`` likewise the number of w8a8 layers and MatMulInteger nodes.
    ``lean``: logits at each row's last real token only (module docstring); ``False`` keeps the
    head over every position (the reference the lean graph is tested and benchmarked against).
    """
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad(), (last_position_head(model) if lean else nullcontext()):
            onnx_export_from_model(model, out_dir, task="text-generation", opset=OPSET, do_validation=False)
    path = out_dir / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    if lean:
        # optimum declares logits as [batch_size, sequence_length, vocab]; the lean graph's
        # sequence axis is 1, and saying so lets ORT and optimum's IO binding size it right
        dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = 1
        onnx.helper.set_model_props(proto, {LOGITS_META: LAST_POSITION})
        onnx.save(proto, str(path))
    graph = proto.graph
    ops = Counter(node.op_type for node in graph.node)
    if ops["MatMulNBits"] != expect_nbits:
        raise CpetError(f"export: graph has {ops['MatMulNBits']} MatMulNBits nodes, expected {expect_nbits}")
    if ops["MatMulInteger"] != expect_int8:
        raise CpetError(f"export: graph has {ops['MatMulInteger']} MatMulInteger nodes, expected {expect_int8}")
    return {"matmul_nbits": ops["MatMulNBits"], "matmul_integer": ops["MatMulInteger"], "matmul": ops["MatMul"], "logits": LAST_POSITION if lean else "all",
            "inputs": [i.name for i in graph.input], "bytes": folder_bytes(out_dir)}


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (what a deployment copies)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cuda_usable() -> bool:
    """ORT lists CUDA *and* torch sees a GPU; onnxruntime-gpu lists CUDA even on GPU-less hosts."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and torch.cuda.is_available()


SPINNING = "session.intra_op.allow_spinning"


def session_options(threads: int | None = None):
    """The one ``SessionOptions`` every cpet session uses (export parity, bench, every variant).

    All of ORT's graph optimizations (``ORT_ENABLE_ALL``: constant folding, fusions, layout) at
    load time, on every graph alike; no offline optimization pass is applied to any graph.
    Sequential execution with one inter-op thread; ``threads`` intra-op threads (None / 0: ORT's
    default, every physical core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads or 0
    # No busy-waiting between runs: ORT's pool threads otherwise spin after each call and steal the
    # cores from whatever runs next in this process (the PyTorch model in parity checks and in the
    # interleaved benchmark) or on this shared machine.
    opts.add_session_config_entry(SPINNING, "0")
    return opts


def describe_options(opts) -> dict:
    """The settings of ``opts`` that change speed, as plain values (for reports and tests)."""
    return {"graph_optimization_level": str(opts.graph_optimization_level).rsplit(".", 1)[-1],
            "execution_mode": str(opts.execution_mode).rsplit(".", 1)[-1],
            "intra_op_num_threads": opts.intra_op_num_threads, "inter_op_num_threads": opts.inter_op_num_threads,
            "allow_spinning": opts.get_session_config_entry(SPINNING)}


def session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """An ``InferenceSession`` on ``device`` ('cpu' | 'cuda') with :func:`session_options`; raises if
    CUDA was asked for but ORT fell back to CPU, so a CPU run is never reported as GPU."""
    import onnxruntime as ort

    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    sess = ort.InferenceSession(str(Path(path) / "model.onnx"), session_options(threads), providers=providers)
    if device == "cuda" and sess.get_providers()[0] != CUDA:
        raise CpetError(f"{path}: ONNX Runtime fell back to {sess.get_providers()[0]} instead of CUDA")
    return sess


class OnnxLM:
    """``OnnxLM(session)(input_ids, attention_mask)`` -> the graph's logits (torch, float32):
    ``[batch, 1, vocab]`` from a lean graph (``self.lean``), ``[batch, seq, vocab]`` from a full one.
    :meth:`last_logits` reads ``[batch, vocab]`` at the label position from either;
    :meth:`position_logits` any positions (a full graph; a lean one only at the last position), and
    :meth:`label_scores` a verbalizer's label scores exactly as ``cpet.lmcls.label_scores`` does.

    Position ids are ``0..seq-1`` as the PyTorch model builds them for right-padded batches.
    """

    def __init__(self, sess) -> None:
        self.sess = sess
        self.inputs = {i.name for i in sess.get_inputs()}
        self.lean = sess.get_modelmeta().custom_metadata_map.get(LOGITS_META) == LAST_POSITION

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        ids = input_ids.numpy().astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": attention_mask.numpy().astype(np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return feeds

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(["logits"], self.feeds(input_ids, attention_mask))[0])

    def last_logits(self, batch: dict) -> torch.Tensor:
        """Logits at each row's last real position ``[batch, vocab]`` (as ``lmcls.label_position_logits``)."""
        from cpet.lmcls import last_token_logits

        out = self(batch["input_ids"], batch["attention_mask"])
        return out[:, 0] if self.lean else last_token_logits(out, batch["attention_mask"])

    def position_logits(self, batch: dict, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, P, vocab]`` at ``positions`` ``[rows, P]`` of each row of ``batch``.

        A lean graph holds only each row's last real position: asking it for any other is an error
        (export the task's graph with ``lean=False``), not a silent wrong answer."""
        if self.lean:
            last = last_real_position(batch["attention_mask"])[:, None]
            if not torch.equal(positions, last.expand_as(positions)):
                raise CpetError("this ONNX graph has the lean head (logits at the last position only); "
                                "multi-token label scoring needs a graph exported with lean=False")
            return self.last_logits(batch)[:, None].expand(-1, positions.shape[1], -1)
        out = self(batch["input_ids"], batch["attention_mask"])
        return out[torch.arange(out.shape[0])[:, None].expand_as(positions), positions]

    def label_scores(self, batch: dict, verbalizer) -> torch.Tensor:
        """``[batch, n_labels]`` label scores of ``verbalizer`` (``cpet.lmcls.label_scores``' numbers)."""
        from cpet.lmcls import expand_labels, scores_from_logits

        if verbalizer.first_token:
            return self.last_logits(batch)[:, list(verbalizer.token_ids)].float()
        labels = expand_labels(batch, verbalizer)
        logits = self.position_logits(labels.model_inputs(), labels.positions)
        columns = torch.arange(logits.shape[1])[None].expand_as(labels.positions)
        return scores_from_logits(logits, columns, labels, verbalizer.scoring)
