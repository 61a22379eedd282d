"""The compress stage end to end on a tiny project: artifacts, manifest, metrics, reload."""

import json

import torch

from cpet.compress import load_compressed, read_manifest
from cpet.stages import STAGES


def test_compress_stage_writes_model_manifest_and_metrics(tiny_project):
    root, params = tiny_project
    out = STAGES["compress"](params, root)
    assert set(out) == {"int8", "struct"}
    for name, metrics in out.items():
        folder = root / "models/compressed" / name
        manifest = read_manifest(folder)
        assert manifest["source"]["sha256"] and manifest["bytes_on_disk"] > 0
        saved = json.loads((root / "reports/compress" / f"{name}.json").read_text())
        assert saved["method"] == name and 0 < saved["size_ratio"] < 1
        for when in ("before", "after"):
            assert 0 <= saved[when]["tasks"]["tiny"]["accuracy"] <= 1
            assert saved[when]["perplexity"] > 1 and saved[when]["latency_ms"] > 0
        assert saved["before"] == out["int8"]["before"]  # one cached baseline
        model = load_compressed(folder, form="train")
        ids = torch.tensor([[3, 4, 5, 6]])
        deployed = load_compressed(folder, form="deploy")
        torch.testing.assert_close(model(input_ids=ids).logits, deployed(input_ids=ids).logits)
    assert out["int8"]["size_ratio"] < 0.4  # packed int8 + fp32 embeddings
    from cpet.stages.compress import table

    md = table(root)
    assert "| int8 |" in md and "| struct |" in md and "| original (fp32) |" in md
    kept = read_manifest(root / "models/compressed/struct")["kept"]
    assert any(k.endswith("o_proj") for k in kept)


def test_compress_one_method_via_cli(tiny_project, tmp_path):
    import yaml

    from cpet.cli import main

    root, params = tiny_project
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    assert main(["--params", str(p), "--root", str(root), "compress", "--method", "int8"]) == 0
    assert (root / "models/compressed/int8/manifest.json").is_file()
    assert not (root / "models/compressed/struct").exists()
    assert main(["--params", str(p), "--root", str(root), "compress", "--method", "nope"]) == 2


def test_compress_model_command_needs_no_pipeline(tiny_project, tmp_path, capsys):
    from cpet.cli import main

    root, _ = tiny_project
    calib = tmp_path / "calib.txt"
    calib.write_text("good movie the plot\nbad film very dull\n")
    out = tmp_path / "int4"
    args = ["compress-model", "--model", str(root / "models/base"), "--out", str(out), "--calib", str(calib),
            "--method", '{"method": "int4", "group_size": 32, "algorithm": "gptq"}']
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["method"] == "int4"
    bad = args[:-1] + ['{"method": "int4", "group_size": 48}']
    assert main(bad) == 2
    assert "compress-model.--method.group_size" in capsys.readouterr().err
    assert main(args[:-1] + ["not-configured"]) == 2
