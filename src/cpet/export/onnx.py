"""ONNX graphs through optimum, and ONNX Runtime sessions that say which device really runs them.

The graph is optimum's ``text-generation`` export (no past key/values: classification needs one
forward pass) of the deployment form from :mod:`cpet.export.sidepath`; quantized layers trace
straight into ``MatMulNBits`` nodes, so no graph rewrite is needed. The folder is what
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir, use_cache=False)`` loads.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cpet.errors import CpetError

#: optimum's recommended minimum for Llama (ORT 1.31 runs opset <= 23)
OPSET = 18
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike, *, expect_nbits: int = 0) -> dict:
    """Export ``model`` (a plain HF causal LM, deployment form) into ``out_dir``; returns graph facts.

    ``expect_nbits`` is the number of quantized layers: the graph must hold exactly that many
    MatMulNBits nodes (a layer silently exported as a float MatMul would be a wrong artifact).
    """
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            onnx_export_from_model(model, out_dir, task="text-generation", opset=OPSET, do_validation=False)
    graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    if ops["MatMulNBits"] != expect_nbits:
        raise CpetError(f"export: graph has {ops['MatMulNBits']} MatMulNBits nodes, expected {expect_nbits}")
    return {"matmul_nbits": ops["MatMulNBits"], "matmul": ops["MatMul"],
            "inputs": [i.name for i in graph.input], "bytes": folder_bytes(out_dir)}


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (what a deployment copies)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cuda_usable() -> bool:
    """ORT lists CUDA *and* torch sees a GPU; onnxruntime-gpu lists CUDA even on GPU-less hosts."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and torch.cuda.is_available()


def session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """An ``InferenceSession`` on ``device`` ('cpu' | 'cuda'); raises if CUDA was asked for but ORT fell
    back to CPU, so a CPU run is never reported as GPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No busy-waiting between runs: ORT's pool threads otherwise spin after each call and steal the
    # cores from whatever runs next in this process (the PyTorch model in parity checks and in the
    # interleaved benchmark) or on this shared machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    sess = ort.InferenceSession(str(Path(path) / "model.onnx"), opts, providers=providers)
    if device == "cuda" and sess.get_providers()[0] != CUDA:
        raise CpetError(f"{path}: ONNX Runtime fell back to {sess.get_providers()[0]} instead of CUDA")
    return sess


class OnnxLM:
    """``OnnxLM(session)(input_ids, attention_mask)`` -> logits ``[batch, seq, vocab]`` (torch, float32).

    Position ids are ``0..seq-1`` as the PyTorch model builds them for right-padded batches.
    """

    def __init__(self, sess) -> None:
        self.sess = sess
        self.inputs = {i.name for i in sess.get_inputs()}

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

        return last_token_logits(self(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
