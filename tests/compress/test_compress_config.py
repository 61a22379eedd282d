"""Configs: registered names, validation errors that name the offending key, refusals."""

from __future__ import annotations

import pytest
import torch

from cpet.compress import METHODS, compress, parse_config
from cpet.compress.config import IntNConfig, MixedConfig
from cpet.errors import ConfigError, CpetError, Unsupported


def test_registry_has_every_method():
    assert {"int8", "int4", "int3", "nf4", "unstructured", "2:4", "nm", "structured", "moe", "mixed"} <= set(METHODS)


def test_parse_builds_typed_config_with_defaults():
    cfg = parse_config("my_int4", {"method": "int4", "group_size": 64})
    assert isinstance(cfg, IntNConfig) and cfg.bits == 4 and cfg.group_size == 64 and cfg.algorithm == "auto"
    assert parse_config("x", {"method": "int3"}).bits == 3
    assert cfg.key("group_size") == "compress.methods.my_int4.group_size"


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"method": "int5"}, "compress.methods.m.method", "unknown method 'int5'"),
        ({"group_size": 8}, "compress.methods.m.method", "missing"),
        ({"method": "int4", "group_size": 0}, "compress.methods.m.group_size", "greater than 0"),
        ({"method": "int4", "groupsize": 64}, "compress.methods.m.groupsize", "unknown key"),
        ({"method": "int8", "embeddings": "maybe"}, "compress.methods.m.embeddings", "boolean"),
        ({"method": "unstructured", "sparsity": 1.5}, "compress.methods.m.sparsity", "less than 1"),
        ({"method": "unstructured", "score": "random"}, "compress.methods.m.score", "magnitude"),
        ({"method": "nm", "n": 4, "m": 4}, "compress.methods.m", "n (4) must be smaller than m (4)"),
        ({"method": "2:4", "n": 1}, "compress.methods.m", "use method 'nm'"),
        ({"method": "structured"}, "compress.methods.m", "nothing to remove"),
        ({"method": "moe", "num_experts": 4, "top_k": 5}, "compress.methods.m", "top_k (5)"),
        ({"method": "mixed", "steps": []}, "compress.methods.m.steps", "non-empty"),
        ({"method": "mixed", "steps": [{"method": "int8"}], "extra": 1}, "compress.methods.m.extra", "unknown key"),
    ],
)
def test_bad_configs_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config("m", raw)
    msg = str(err.value)
    assert msg.startswith(key) and words in msg, msg


def test_mixed_parses_steps_in_order_and_refuses_wrong_order():
    cfg = parse_config(
        "mx", {"method": "mixed", "steps": [{"method": "structured", "ffn_ratio": 0.5}, {"method": "int8"}]}
    )
    assert isinstance(cfg, MixedConfig) and [s.method for s in cfg.steps] == ["structured", "int8"]
    assert cfg.steps[1].key() == "compress.methods.mx.steps[1]"
    assert cfg.model_dump()["steps"][0]["ffn_ratio"] == 0.5  # subclass fields survive serialisation
    with pytest.raises(
        ConfigError, match=r"compress\.methods\.mx\.steps\[1\]\.method: 'structured' cannot follow 'int8'"
    ):
        parse_config(
            "mx", {"method": "mixed", "steps": [{"method": "int8"}, {"method": "structured", "ffn_ratio": 0.5}]}
        )
    with pytest.raises(ConfigError, match=r"steps\[1\]\.method: 'int4' cannot follow 'int8'"):
        parse_config("mx", {"method": "mixed", "steps": [{"method": "int8"}, {"method": "int4"}]})
    with pytest.raises(ConfigError, match=r"compress\.methods\.mx\.steps\[0\]\.group_size"):
        parse_config("mx", {"method": "mixed", "steps": [{"method": "int4", "group_size": -1}]})
    with pytest.raises(ConfigError, match=r"steps\[0\]\.method: 'mixed' cannot be a step"):
        parse_config("mx", {"method": "mixed", "steps": [{"method": "mixed", "steps": [{"method": "int8"}]}]})


def test_model_dependent_checks_name_the_key(llama, calib):
    with pytest.raises(ConfigError, match=r"compress\.methods\.q\.group_size: must divide .* 48 does not divide 64"):
        compress(llama, parse_config("q", {"method": "int4", "group_size": 48}))
    with pytest.raises(ConfigError, match=r"compress\.methods\.q\.algorithm: 'gptq' needs calibration data"):
        compress(llama, parse_config("q", {"method": "int4", "algorithm": "gptq", "group_size": 32}))
    with pytest.raises(ConfigError, match=r"compress\.methods\.p\.score: 'wanda' needs calibration"):
        compress(llama, parse_config("p", {"method": "unstructured", "score": "wanda"}))
    with pytest.raises(ConfigError, match=r"compress\.methods\.p\.m: must divide"):
        compress(llama, parse_config("p", {"method": "nm", "n": 2, "m": 5}))
    with pytest.raises(ConfigError, match=r"compress\.methods\.s\.importance: 'activation' needs calibration"):
        compress(llama, parse_config("s", {"method": "structured", "ffn_ratio": 0.5}))
    with pytest.raises(ConfigError, match=r"compress\.methods\.e\.num_experts: must divide the FFN width 128"):
        compress(llama, parse_config("e", {"method": "moe", "num_experts": 3, "top_k": 1}), calib)
    with pytest.raises(ConfigError, match=r"compress\.methods\.e\.router: 'fitted' needs calibration"):
        compress(llama, parse_config("e", {"method": "moe", "num_experts": 4}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without CUDA")
def test_nf4_is_refused_on_cpu(llama):
    with pytest.raises(CpetError, match=r"compress\.methods\.n\.method: nf4 .* needs a CUDA GPU.*use 'int4'"):
        compress(llama, parse_config("n", {"method": "nf4"}))


def test_structured_refuses_fused_qkv(make_model):
    with pytest.raises(Unsupported, match=r"structured cannot compress GPTNeoXForCausalLM: heads_ratio: .*fused QKV"):
        compress(
            make_model("neox"),
            parse_config("s", {"method": "structured", "heads_ratio": 0.5, "importance": "magnitude"}),
        )


def test_compress_accepts_raw_dict_and_leaves_source_untouched(llama, inputs):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    cm = compress(llama, {"method": "unstructured", "sparsity": 0.5}, name="p")
    assert cm.config.key() == "compress.methods.p"
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
