"""Support matrix: nine decoder-LM families x every registered compression method.

Each cell runs compress -> save -> reload (training and deployment form; vanilla
``from_pretrained`` where nothing is packed) -> LoRA + recovery modules -> one training step
(masks and grids intact) -> parity of the deployment form: PyTorch (packed weights + side paths)
everywhere, ONNX Runtime for every cell except ``moe`` (its data-dependent routing is not an ONNX
export target in this project). A cell a method cannot support must raise a clear error that
names the model class and method; :data:`REFUSED` lists them, and the README's "Supported model
families" table is generated from this file (``CPET_WRITE_SUPPORT_TABLE=1`` rewrites it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from families import FAMILIES, build

from cpet.compress import (
    METHODS,
    compress,
    load_compressed,
    load_compressed_model,
    parse_config,
    save_compressed,
)
from cpet.compress.arch import linear_layers
from cpet.errors import CpetError, Unsupported
from libsettings import lora_settings, recovery_settings

#: matrix column -> method config (tiny shapes: hidden 64, FFN 128 or 256)
CASES: dict[str, dict] = {
    "int8": {"method": "int8"},
    "int4": {"method": "int4", "group_size": 16},  # GPTQ: calibration is given
    "int3": {"method": "int3", "group_size": 16, "algorithm": "rtn"},
    "nf4": {"method": "nf4", "block_size": 64},
    "unstructured": {"method": "unstructured", "sparsity": 0.5, "score": "wanda"},
    "2:4": {"method": "2:4"},
    "nm": {"method": "nm", "n": 1, "m": 4},
    "structured-ffn": {"method": "structured", "ffn_ratio": 0.5},
    "structured-heads": {"method": "structured", "heads_ratio": 0.5},
    "moe": {"method": "moe", "num_experts": 4, "top_k": 2},
    "w8a8": {"method": "w8a8"},
    "mixed": {"method": "mixed", "steps": [{"method": "2:4"}, {"method": "int4", "group_size": 16}]},
}
FUSED = r"structured cannot compress (GPT2LMHeadModel|GPTNeoXForCausalLM|BloomForCausalLM|FalconForCausalLM): heads_ratio: its heads live in a fused QKV projection"
#: reasons a cell is refused: key -> (error class, regex the message must match, README wording)
REASONS: dict[str, tuple[type[Exception], str, str]] = {
    "cuda": (CpetError, r"nf4 is bitsandbytes 4-bit NF4 and needs a CUDA GPU",
             "needs a CUDA GPU (bitsandbytes NF4); refused on CPU hosts"),
    "fused": (Unsupported, FUSED, ("heads live in a fused QKV projection and the config derives head_dim "
                                   "from hidden_size / heads, so fewer heads cannot be described")),
    "head_dim": (Unsupported, r"structured cannot compress OPTForCausalLM: .*does not have the sliced shapes",
                 "the attention derives head_dim from hidden_size / heads (no head_dim config field)"),
    "ffn_width": (Unsupported, r"structured cannot compress BloomForCausalLM: ffn_ratio: BloomConfig has no field",
                  "the FFN width is hard-coded as 4 x hidden_size (no config field to rewrite)"),
}
REFUSED: dict[tuple[str, str], str] = {
    **{(f, "nf4"): "cuda" for f in FAMILIES},  # the table shows CPU hosts; CUDA hosts skip these cells
    **{(f, "structured-heads"): "fused" for f in ("gpt_neox", "gpt2", "bloom", "falcon")},
    ("opt", "structured-heads"): "head_dim",
    ("bloom", "structured-ffn"): "ffn_width",
}
#: cases that must record every projection except the LM head (GPT-2's Conv1D ones included)
EVERY_LAYER = {"int8", "int4", "int3", "unstructured", "2:4", "nm", "mixed", "w8a8"}
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def test_every_registered_method_is_in_the_matrix():
    assert {c["method"] for c in CASES.values()} == set(METHODS)


def logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def train_step(cm) -> torch.nn.Module:
    """LoRA (attention) + recovery (every projection) on the loaded training form, one SGD step."""
    from cpet.pet import attach_lora, attach_recovery

    bundle = attach_lora(attach_recovery(cm.model, recovery_settings(rank=4)), lora_settings(rank=4, dropout=0.0))
    params = [p for p in bundle.parameters() if p.requires_grad]
    assert params and any("lora_" in n for n, p in bundle.named_parameters() if p.requires_grad)
    bundle.train()
    loss = bundle(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    assert torch.isfinite(loss)
    assert any(p.abs().sum() > 0 for n, p in bundle.named_parameters() if "lora_B" in n)  # it learned
    cm.verify()  # base weights frozen: masks and quantization grids intact
    return bundle.eval()


def onnx_parity(bundle, records, out: Path) -> None:
    from cpet.export import deploy_model
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.lmcls import last_token_logits
    from cpet.stages.export import quantized_linears

    export_onnx(deploy_model(bundle, records, "onnx"), out, expect_nbits=quantized_linears(records),
                expect_int8=quantized_linears(records, act=True))
    ort = OnnxLM(session(out)).last_logits({"input_ids": IDS, "attention_mask": MASK})  # lean graph
    with torch.no_grad():
        ref = last_token_logits(bundle(input_ids=IDS, attention_mask=MASK).logits, MASK)
    torch.testing.assert_close(ort, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_support_matrix(family, case, calib, tmp_path):
    from cpet.export import deploy_model

    model = build(family)
    cfg = parse_config(case, CASES[case])
    if (family, case) in REFUSED:
        if REFUSED[family, case] == "cuda" and torch.cuda.is_available():
            pytest.skip("nf4 on CUDA is covered by test_compress_quant; this matrix checks the CPU refusal")
        cls, pattern, _ = REASONS[REFUSED[family, case]]
        with pytest.raises(cls, match=pattern) as err:
            compress(model, cfg, calib)
        assert case in str(err.value)  # names the method (and, for Unsupported, the model class: see REASONS)
        return
    cm = compress(model, cfg, calib)
    cm.verify()
    if case in EVERY_LAYER:
        assert set(cm.records) == set(linear_layers(model))
    reference = logits(cm.model)
    assert torch.isfinite(reference).all()
    man = save_compressed(cm, tmp_path / "c")
    assert torch.equal(logits(load_compressed(tmp_path / "c")), reference)
    torch.testing.assert_close(logits(load_compressed(tmp_path / "c", form="deploy")), reference,
                               atol=1e-5, rtol=1e-5)
    if man["weights_file"] == "model.safetensors":  # structured: the rewritten config reloads as is
        vanilla = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
        torch.testing.assert_close(logits(vanilla), reference, atol=1e-5, rtol=1e-5)
    loaded = load_compressed_model(tmp_path / "c")
    bundle = train_step(loaded)
    torch.testing.assert_close(logits(deploy_model(bundle, loaded.records, "torch")), logits(bundle),
                               atol=1e-4, rtol=0)
    if case != "moe":
        onnx_parity(bundle, loaded.records, tmp_path / "onnx")


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_nothing_to_compress_is_refused(family, calib):
    """Every projection excluded: an error naming model class and method, never an untouched "compressed" model."""
    model = build(family)
    for raw in ({"method": "int8", "exclude": ["*"]}, {"method": "unstructured", "score": "wanda", "exclude": ["*"]}):
        with pytest.raises(Unsupported, match=rf"{raw['method']} cannot compress {type(model).__name__}: no projection"):
            compress(model, raw, calib)


def test_unchanged_model_is_refused(calib):
    model = build("gpt2")
    with pytest.raises(Unsupported, match=r"unstructured cannot compress GPT2LMHeadModel: nothing in the model changed"):
        compress(model, {"method": "unstructured", "sparsity": 0.001}, calib)


def support_table() -> str:
    """The README table: family x matrix column, "yes" or "no (reason letter)", then the reasons."""
    letters = {key: chr(ord("a") + i) for i, key in enumerate(REASONS)}
    lines = ["| family (model class) | " + " | ".join(f"`{c}`" for c in CASES) + " |",
             "| --- |" + " --- |" * len(CASES)]
    for family in FAMILIES:
        cells = [f"no ({letters[REFUSED[family, c]]})" if (family, c) in REFUSED else "yes" for c in CASES]
        lines.append(f"| {family} (`{FAMILIES[family][1].__name__}`) | " + " | ".join(cells) + " |")
    used = {r for r in REFUSED.values()}
    notes = [f"- ({letters[k]}) {REASONS[k][2]}" for k in REASONS if k in used]
    return "\n".join(lines + [""] + notes)


def test_readme_support_table_matches_the_matrix():
    text = README.read_text()
    block = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    assert block.search(text), f"README.md lacks the {START} ... {END} section"
    fresh = f"{START}\n{support_table()}\n{END}"
    if os.environ.get("CPET_WRITE_SUPPORT_TABLE") == "1":
        README.write_text(block.sub(lambda _: fresh, text))
        return
    assert block.search(text).group(0) == fresh, "README support table is stale: rerun with CPET_WRITE_SUPPORT_TABLE=1"
