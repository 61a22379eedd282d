"""Export: the exact deployment form, ONNX parity per compression family, the export stage."""

import copy
import io
import json
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpet.compress import compress
from cpet.config import parse_params
from cpet.errors import CpetError
from cpet.export import deploy_model, layer_terms
from cpet.pet import attach_lora, attach_recovery
from libsettings import lora_settings, recovery_settings

IDS = torch.tensor([[5, 9, 3, 17, 2, 8, 11, 4], [7, 1, 12, 6, 30, 2, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def bundle_on(base: torch.nn.Module, act: str = "gelu", recovery: bool = True, seed: int = 1):
    """LoRA (+ recovery) with random, non-zero factors: a trained bundle's shape without training."""
    model = attach_recovery(base, recovery_settings(rank=4, act=act)) if recovery else base
    model = attach_lora(model, lora_settings(rank=4, alpha=8.0, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "rec_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits[MASK.bool()]


def last_logits(model):
    """Logits at each row's label position (last real token), ``[batch, vocab]``: what the lean
    ONNX graph outputs."""
    from cpet.lmcls import last_token_logits

    with torch.no_grad():
        return last_token_logits(model(input_ids=IDS, attention_mask=MASK).logits, MASK)


METHODS = {
    "int8": {"method": "int8"},
    "int4": {"method": "int4", "group_size": 32, "algorithm": "rtn"},
    "int3": {"method": "int3", "group_size": 64, "algorithm": "rtn"},
    "unstructured": {"method": "unstructured", "sparsity": 0.5},
    "2:4": {"method": "2:4"},
    "structured": {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.25, "importance": "magnitude"},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_onnx_parity_per_method(method, tmp_path):
    """Bundle (LoRA + GELU recovery) on each compressed base: ORT logits == PyTorch logits."""
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.stages.export import quantized_linears

    cm = compress(tiny_llama(), METHODS[method], name=method)
    bundle = bundle_on(copy.deepcopy(cm.model))
    graph = export_onnx(deploy_model(bundle, cm.records, "onnx"), tmp_path / method,
                        expect_nbits=quantized_linears(cm.records))
    assert graph["matmul_nbits"] == (14 if method.startswith("int") else 0)
    import onnx

    inits = onnx.load(str(tmp_path / method / "model.onnx")).graph.initializer
    assert sum(40 in i.dims for i in inits) == 1  # tied LM head = Transpose(embedding), stored once
    lm = OnnxLM(session(tmp_path / method))
    assert lm.lean and lm(IDS, MASK).shape == (2, 1, 40)  # the LM head at the label position only
    ort_logits = lm.last_logits({"input_ids": IDS, "attention_mask": MASK})
    torch.testing.assert_close(ort_logits, last_logits(bundle), atol=1e-4, rtol=0)
    # the PyTorch deployment form (packed weights, side paths) computes the same
    torch.testing.assert_close(logits(deploy_model(bundle, cm.records, "torch")), logits(bundle), atol=1e-4, rtol=0)


def test_ort_model_for_causal_lm_loads_the_export(tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from cpet.export.onnx import export_onnx

    cm = compress(tiny_llama(), METHODS["int4"], name="int4")
    bundle = bundle_on(copy.deepcopy(cm.model))
    export_onnx(deploy_model(bundle, cm.records, "onnx"), tmp_path, expect_nbits=14)
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path, use_cache=False, use_io_binding=False)
    out = ort_model(input_ids=IDS, attention_mask=MASK).logits
    assert out.shape == (2, 1, 40)  # lean graph: next-token logits after each row's last real token
    torch.testing.assert_close(out[:, -1], last_logits(bundle), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["int4", "structured"])
def test_lean_graph_is_the_full_graph_at_the_label_position(method, tmp_path):
    """The lean graph outputs [batch, 1, vocab] and equals the full graph's logits at each row's last
    real token, for right-padded rows (cpet's batches) and left-padded ones (generation)."""
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.lmcls import last_token_logits
    from cpet.stages.export import quantized_linears

    cm = compress(tiny_llama(), METHODS[method], name=method)
    deployed = deploy_model(bundle_on(copy.deepcopy(cm.model)), cm.records, "onnx")
    n = quantized_linears(cm.records)
    lean_graph = export_onnx(deployed, tmp_path / "lean", expect_nbits=n)
    full_graph = export_onnx(deployed, tmp_path / "full", expect_nbits=n, lean=False)
    assert (lean_graph["logits"], full_graph["logits"]) == ("last_position", "all")
    lean, full = OnnxLM(session(tmp_path / "lean")), OnnxLM(session(tmp_path / "full"))
    assert lean.lean and not full.lean
    assert lean.sess.get_outputs()[0].shape == ["batch_size", 1, 40]
    left_ids, left_mask = IDS.roll(2, dims=1), MASK.roll(2, dims=1)  # row 1 padded on the left
    for ids, mask in ((IDS, MASK), (left_ids, left_mask), (IDS[:1, :5], MASK[:1, :5])):
        whole = full(ids, mask)
        assert whole.shape == (*ids.shape, 40) and lean(ids, mask).shape == (ids.shape[0], 1, 40)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last 1 in each row, either padding side
        expected = whole[torch.arange(ids.shape[0]), last]
        torch.testing.assert_close(lean(ids, mask)[:, 0], expected, atol=1e-5, rtol=0)
        batch = {"input_ids": ids, "attention_mask": mask}
        if bool((mask[:, 0] == 1).all()):  # right-padded: both read the same label-position logits
            torch.testing.assert_close(lean.last_logits(batch), full.last_logits(batch), atol=1e-5, rtol=0)
            torch.testing.assert_close(full.last_logits(batch), last_token_logits(whole, mask))


def test_multi_token_labels_score_alike_in_onnx_and_pytorch(tmp_path):
    """A task whose words are scored whole gets the full-head graph; ONNX label scores (sum and
    mean) equal PyTorch's ``lmcls.label_scores`` within 1e-4, so do the parity helpers' scores and
    logits; a lean graph refuses multi-token scoring instead of answering wrong, and still scores
    first-token tasks like PyTorch."""
    from cpet.export import scored_logits, torch_position_logits
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.lmcls import Verbalizer, label_scores
    from cpet.stages.export import quantized_linears

    cm = compress(tiny_llama(), METHODS["int4"], name="int4")
    bundle = bundle_on(copy.deepcopy(cm.model))
    deployed = deploy_model(bundle, cm.records, "onnx")
    n = quantized_linears(cm.records)
    export_onnx(deployed, tmp_path / "full", expect_nbits=n, lean=False)
    export_onnx(deployed, tmp_path / "lean", expect_nbits=n)
    full, lean = OnnxLM(session(tmp_path / "full")), OnnxLM(session(tmp_path / "lean"))
    batch = {"input_ids": IDS, "attention_mask": MASK}
    words = ((3, 5), (3, 9, 11), (7,))  # 2, 3 and 1 tokens; two share their first token
    for scoring in ("sum", "mean"):
        v = Verbalizer(("a", "b", "c"), (3, 3, 7), words, scoring)
        with torch.no_grad():
            ref = label_scores(bundle, batch, v).scores
            torch_scores, torch_logits = scored_logits(torch_position_logits(bundle), batch, v)
        ort_scores, ort_logits = scored_logits(full.position_logits, batch, v)
        torch.testing.assert_close(full.label_scores(batch, v), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ort_scores, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch_scores, ref, atol=1e-5, rtol=0)
        assert ort_logits.shape == torch_logits.shape == (2 * (2 + 3 + 1), 40)  # every scored position
        torch.testing.assert_close(ort_logits, torch_logits, atol=1e-4, rtol=0)
        with pytest.raises(CpetError, match="lean head.*lean=False"):
            lean.label_scores(batch, v)
    first = Verbalizer(("a", "b"), (3, 7), ((3, 5), (7,)), "first-token")
    with torch.no_grad():
        ref = label_scores(bundle, batch, first).scores
    torch.testing.assert_close(lean.label_scores(batch, first), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.label_scores(batch, first), ref, atol=1e-4, rtol=0)


def test_cpu_fallback_is_never_reported_as_gpu(tmp_path):
    """Asking for CUDA where ORT has none (this CPU host; also checked on a GPU host whose ORT build
    is CPU-only) gets CPU from ORT: cpet refuses instead of labelling it GPU."""
    from cpet.export.onnx import cuda_usable, export_onnx, session

    export_onnx(deploy_model(tiny_llama()), tmp_path)
    if cuda_usable():
        pytest.skip("a usable CUDA provider is present")
    assert session(tmp_path, "cpu").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(CpetError, match="fell back to CPUExecutionProvider instead of CUDA"):
        session(tmp_path, "cuda")


def test_exact_merge_on_a_float_base():
    """LoRA + identity recovery fold into float weights: merged == unmerged, and no side path is left."""
    cm = compress(tiny_llama(), METHODS["structured"], name="structured")
    bundle = bundle_on(copy.deepcopy(cm.model), act="identity")
    merged = deploy_model(bundle, cm.records, "torch")
    assert not [n for n, _ in merged.named_modules() if n.endswith(".sides")]
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged), logits(bundle), atol=1e-5, rtol=1e-5)


def test_quantized_base_keeps_its_grid_and_naive_requantizing_does_not():
    """On int4 the linear terms become one stacked side path (exact); fold-then-requantize is not."""
    cm = compress(tiny_llama(), METHODS["int4"], name="int4")
    bundle = bundle_on(copy.deepcopy(cm.model), act="identity")
    terms = layer_terms(bundle)["model.layers.0.self_attn.q_proj"][1]
    assert [t.act for t in terms] == ["identity", "identity"]  # LoRA and recovery
    exact = deploy_model(bundle, cm.records, "torch")
    attn = exact.model.layers[0].self_attn
    q_proj = attn.q_proj
    assert len(q_proj.sides) == 1 and q_proj.sides[0].ranks == [8]  # ranks 4 + 4 stacked
    # q/k/v read the same input: one A GEMM for all three (3 x rank 8), o_proj has its own
    assert q_proj.sides[0].shared is attn.k_proj.sides[0].shared is attn.v_proj.sides[0].shared
    assert q_proj.sides[0].shared.A.weight.shape[0] == 24 and attn.o_proj.sides[0].shared is not q_proj.sides[0].shared
    torch.testing.assert_close(logits(exact), logits(bundle), atol=1e-5, rtol=1e-5)
    naive = deploy_model(bundle, cm.records, "torch", requantize=True)
    gap = (logits(naive) - logits(bundle)).abs().max()
    assert gap > 100 * (logits(exact) - logits(bundle)).abs().max()


def test_gelu_recovery_is_never_folded():
    cm = compress(tiny_llama(), METHODS["unstructured"], name="unstructured")
    bundle = bundle_on(copy.deepcopy(cm.model), act="gelu")
    down = deploy_model(bundle, cm.records, "torch").model.layers[0].mlp.down_proj
    assert len(down.sides) == 1 and [type(a) for a in down.sides[0].acts] == [torch.nn.GELU]  # LoRA folded


@pytest.mark.parametrize("method", ["int4", "unstructured"])
def test_shared_side_paths_are_exact(method, tmp_path):
    """Stacked A GEMMs per input and one B GEMM per layer compute what one GEMM pair per path did,
    in PyTorch and in the ONNX graph (fewer MatMul nodes), for LoRA + GELU recovery."""
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.stages.export import quantized_linears

    cm = compress(tiny_llama(), METHODS[method], name=method)
    bundle = bundle_on(copy.deepcopy(cm.model), act="gelu")
    shared, apart = (deploy_model(bundle, cm.records, "torch", share=s) for s in (True, False))
    torch.testing.assert_close(logits(shared), logits(apart), atol=1e-5, rtol=0)
    from cpet.export.sidepath import SharedA

    # every reader consumed its product: no activation is kept after a forward pass
    assert all(m._cache is None for m in shared.modules() if isinstance(m, SharedA))
    from cpet.export.sidepath import SharedSides, SidePath

    n = quantized_linears(cm.records)
    models = {s: deploy_model(bundle, cm.records, "onnx", share=s) for s in (True, False)}
    graphs = {s: export_onnx(m, tmp_path / str(s), expect_nbits=n) for s, m in models.items()}
    kinds = Counter(type(m).__name__ for m in models[True].modules())  # modules() counts a shared A once
    gemms_shared = kinds[SharedA.__name__] + kinds[SharedSides.__name__]
    gemms_apart = 2 * sum(isinstance(m, SidePath) for m in models[False].modules())
    assert kinds[SharedA.__name__] == 2 * 4  # per layer: q/k/v, o, gate/up, down
    assert graphs[False]["matmul"] - graphs[True]["matmul"] == gemms_apart - gemms_shared > 0
    batch = {"input_ids": IDS, "attention_mask": MASK}
    torch.testing.assert_close(OnnxLM(session(tmp_path / "True")).last_logits(batch), last_logits(bundle),
                               atol=1e-4, rtol=0)


def test_merged_adapters_are_refused():
    bundle = bundle_on(tiny_llama(), recovery=False)
    bundle.merge_adapter()
    with pytest.raises(CpetError, match="already merged"):
        deploy_model(bundle)


@pytest.fixture
def recovered(tiny_project):
    root, params = tiny_project
    from cpet.stages import STAGES

    raw = params.model_dump(by_alias=True)
    raw["recover"]["variants"] = ["compressed+cpet"]  # the exported variant only: keeps the test short
    params = parse_params(raw)
    for name in ("compress", "teacher", "recover"):
        STAGES[name](params, root)
    return root, params


def _with(params, **export):
    raw = params.model_dump(by_alias=True)
    raw["export"].update(export)
    return parse_params(raw)


def test_export_stage_checks_parity_and_writes_models(recovered):
    """Beyond tolerance the stage fails with one clear line and writes nothing; within it, every
    task's ONNX model and the parity report are written."""
    from cpet.stages import STAGES

    root, params = recovered
    strict = _with(params, tolerance={"max_abs_logit_diff": 1e-12, "min_top1_agreement": 1.0,
                                      "max_accuracy_drop": 0.0})
    with pytest.raises(CpetError, match=r"export int8/tiny: ONNX parity check failed \(max \|logit diff\|"):
        STAGES["export"](strict, root, method="int8")
    assert not (root / "models/onnx/int8").exists()
    assert not (root / "reports/export/int8.json").exists()
    assert not list((root / "models/onnx").glob(".int8*"))  # no temporary folder left behind

    metrics = STAGES["export"](params, root)
    for method in ("int8", "struct"):
        report = json.loads((root / f"reports/export/{method}.json").read_text())
        row = report["tiny"]
        assert row["top1_agreement"] == 1.0 and row["max_abs_logit_diff"] < 1e-3
        assert row["accuracy_torch"] == row["accuracy_onnx"] == metrics[method]["tiny"]["accuracy_onnx"]
        folder = root / f"models/onnx/{method}/tiny"
        meta = json.loads((folder / "cpet_export.json").read_text())
        assert meta["variant"] == "compressed+cpet" and meta["labels"] == ["neg", "pos"]
        assert (folder / "model.onnx").is_file() and (folder / "tokenizer.json").is_file()
    assert "accuracy_naive_requantized" in json.loads((root / "reports/export/int8.json").read_text())["tiny"]
    assert "accuracy_naive_requantized" not in json.loads((root / "reports/export/struct.json").read_text())["tiny"]

    # the same bundles with words scored whole (both start with "a"): a full-head graph, same parity
    raw = params.model_dump(by_alias=True)
    raw["tasks"]["tiny"].update(verbalizer={"neg": "a no", "pos": "a yes"}, scoring="auto")
    row = STAGES["export"](parse_params(raw), root, method="int8")["int8"]["tiny"]
    assert row["graph"]["logits"] == "all" and row["top1_agreement"] == 1.0 and row["max_abs_logit_diff"] < 1e-3
    meta = json.loads((root / "models/onnx/int8/tiny/cpet_export.json").read_text())
    assert meta["scoring"] == "sum" and len(meta["label_sequences"][0]) == 2


def test_every_session_gets_the_same_options(tmp_path):
    """One SessionOptions recipe for every graph: what a session runs with is read back from ORT."""
    from cpet.export.onnx import describe_options, export_onnx, session, session_options

    export_onnx(deploy_model(tiny_llama()), tmp_path / "a")
    export_onnx(deploy_model(bundle_on(tiny_llama(seed=2), recovery=False)), tmp_path / "b", lean=False)
    got = [describe_options(session(tmp_path / d, threads=1).get_session_options()) for d in ("a", "b")]
    assert got[0] == got[1] == describe_options(session_options(1))
    assert got[0] == {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
                      "intra_op_num_threads": 1, "inter_op_num_threads": 1, "allow_spinning": "0"}


def test_headbench_prints_lean_vs_full_ratios(tmp_path):
    """The issue-12 measurement script runs end to end on the tiny model (2 rounds: shape, not speed)."""
    from pathlib import Path

    from cpet.export.headbench import main

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    out = main(["--params", str(params), "--methods", "struct25kv", "--rounds", "2", "--keep", str(tmp_path)])
    assert set(out["p50_ms"]) == {"original+pet full", "original+pet lean", "compressed/struct25kv lean",
                                  "compressed+cpet/struct25kv full", "compressed+cpet/struct25kv lean",
                                  "compressed+cpet/struct25kv lean-apart"}
    assert out["ratios"]["original+pet: full / lean"]["p50"] > 0
    assert out["ort_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"


@pytest.mark.parametrize("activations", ["per-token", "static"])
def test_w8a8_bundle_exports_to_integer_kernels_that_agree_with_training(activations, tmp_path):
    """A LoRA + recovery bundle on a w8a8 base: every base linear is one MatMulInteger node, ORT's
    profiler shows the integer kernels ran, and ORT agrees with the training form (fake-quantized
    activations) on top-1 with logits within float-rounding distance."""
    import onnxruntime as ort

    from cpet.export.onnx import OnnxLM, export_onnx, session_options
    from cpet.stages.export import quantized_linears

    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, 40, (2, 12), generator=g)} for _ in range(3)]
    cm = compress(tiny_llama(), {"method": "w8a8", "activations": activations}, calib, name="w8a8")
    assert {r.act for r in cm.records.values()} == {activations}
    assert quantized_linears(cm.records) == 0 and quantized_linears(cm.records, act=True) == 14
    bundle = bundle_on(copy.deepcopy(cm.model))
    graph = export_onnx(deploy_model(bundle, cm.records, "onnx"), tmp_path, expect_int8=14)
    assert graph["matmul_integer"] == 14 and graph["matmul_nbits"] == 0
    opts = session_options(1)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    lm = OnnxLM(sess)
    ort_logits = lm.last_logits({"input_ids": IDS, "attention_mask": MASK})
    ran = Counter(e["args"]["op_name"] for e in json.loads(open(sess.end_profiling()).read())
                  if e.get("cat") == "Node" and "op_name" in e.get("args", {}))
    assert ran["MatMulInteger"] >= 14  # kernel events per run; no float MatMul replaced them
    assert (ran["QuantizeLinear"] >= 14) == (activations == "static")
    ref = last_logits(bundle)
    assert torch.equal(ort_logits.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(ort_logits, ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(logits(deploy_model(bundle, cm.records, "torch")), logits(bundle), atol=1e-4, rtol=0)


def test_int8bench_graphs_compute_the_same_product_and_profile_names_the_kernels(tmp_path):
    """The GEMM bench compares like with like (every arithmetic approximates x @ W), and the
    profiler attributes time to the integer kernels of a w8a8 export."""
    import numpy as np
    import onnxruntime as ort

    from cpet.export.int8bench import gemm_graphs, profile
    from cpet.export.onnx import export_onnx

    graphs = gemm_graphs(32, 24)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    out = {name: ort.InferenceSession(g, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for name, g in graphs.items()}
    scale = np.abs(out["fp32"]).max()
    for name in ("per-token", "dynamic-tensor"):
        assert np.abs(out[name] - out["fp32"]).max() < 0.05 * scale, name
    g = torch.Generator().manual_seed(3)
    cm = compress(tiny_llama(), {"method": "w8a8"}, [{"input_ids": torch.randint(0, 40, (2, 12), generator=g)}])
    export_onnx(deploy_model(cm.model, cm.records, "onnx"), tmp_path, expect_int8=14)
    prof = profile(tmp_path, batch=1, seq_len=8, rounds=2, threads=1)
    assert prof["runs"] == 2 and "MatMulInteger" in prof["ops"]
    assert abs(sum(op["share"] for op in prof["ops"].values()) - 1) < 0.01


def test_int8bench_models_times_base_and_compressed_folders(tmp_path):
    from cpet.compress import save_compressed
    from cpet.export.int8bench import models

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, 40, (2, 12), generator=g)}]
    for act in ("per-token", "static"):
        save_compressed(compress(base, {"method": "w8a8", "activations": act}, calib), tmp_path / f"w8a8-{act}")
    out = models(str(tmp_path / "base"), [str(tmp_path / "w8a8-per-token"), str(tmp_path / "w8a8-static")],
                 seq_len=8, rounds=3, threads=1, keep=str(tmp_path / "onnx"))
    assert set(out["batch 1"]) == set(out["batch 16"]) == {"base", "w8a8-per-token", "w8a8-static"}
    assert out["batch 1"]["base"]["speedup"] == 1.0 and out["batch 16"]["w8a8-static"]["p50_ms"] > 0


def test_a_bundle_is_usable_without_the_registry(recovered, capsys, monkeypatch):
    """`cpet predict --bundle` = the README's three-line Python load; the bundle's LoRA part is a
    standard peft folder that PeftModel.from_pretrained loads on the compressed model."""
    import yaml
    from peft import PeftModel

    from cpet.cli import main
    from cpet.compress import load_compressed
    from cpet.lmcls import Verbalizer, predict
    from cpet.pet import load_bundle
    from cpet.stages.common import load_tokenizer

    root, params = recovered
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    cli = ["--params", str(root / "params.yaml"), "--root", str(root), "predict"]
    bundle_dir = root / "models/recover/int8/tiny/compressed+cpet"
    texts = ["a b c", "d e", "f g h i"]
    assert main([*cli, "--bundle", str(bundle_dir), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts and all(r["task"] == "tiny" for r in rows)
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n\n"))  # '-': one text a line
    assert main([*cli, "--bundle", str(bundle_dir), "-"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows

    # the three lines of Python (README "Use a bundle without the registry")
    model = load_bundle(load_compressed(root / "models/compressed/int8"), bundle_dir).eval()
    tokenizer = load_tokenizer(root)
    task = params.tasks["tiny"]
    verbalizer = Verbalizer.build(tokenizer, task.verbalizer, scoring=task.scoring)
    idx, _ = predict(model, tokenizer, texts, task.template, verbalizer, max_length=params.serve.max_length)
    assert [r["label"] for r in rows] == [verbalizer.labels[k] for k in idx]

    lora = PeftModel.from_pretrained(load_compressed(root / "models/compressed/int8"), bundle_dir / "adapter")
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    assert ours and len(ours) == len(theirs)
    for (n1, a), (n2, b) in zip(sorted(ours.items()), sorted(theirs.items())):
        assert torch.equal(a, b), (n1, n2)

    assert main([*cli, "--bundle", str(root / "models"), "x"]) == 1
    assert "not a bundle folder" in capsys.readouterr().err
    assert main([*cli, "--bundle", str(bundle_dir), "--task", "nope", "x"]) == 2
    assert "--task: 'nope' is not a configured task" in capsys.readouterr().err
