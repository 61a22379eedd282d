"""Device and precision resolution (cpet.env)."""

import pytest
import torch

from cpet import env
from cpet.errors import ConfigError


def test_device_follows_cpet_device(monkeypatch):
    monkeypatch.setenv("CPET_DEVICE", "cpu")
    assert env.device() == torch.device("cpu")
    monkeypatch.setenv("CPET_DEVICE", "auto")
    assert env.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("CPET_DEVICE", "gpu0")
    with pytest.raises(ConfigError, match="CPET_DEVICE: 'gpu0' is not a torch device"):
        env.device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CPET_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        env.device()


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_uses_bf16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(env, "bf16_native", lambda dev: native)
    assert env.use_bf16("auto", "cpu") is native
    assert env.use_bf16("bf16", "cpu") is True  # asked for explicitly: even emulated
    assert env.use_bf16("no", "cpu") is False


def test_bf16_native_answers_for_every_device_kind():
    assert isinstance(env.bf16_native(torch.device("cpu")), bool)
    assert env.bf16_native("meta") is False
    if not torch.cuda.is_available():
        assert env.bf16_native("cuda") is False
