"""Quiet, offline-friendly defaults: no telemetry, no hub calls, unless the user set otherwise."""

import os
import threading

QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per artifact download floods the logs
    "ORT_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_quiet_defaults() -> None:
    """Set each variable in :data:`QUIET` unless already set (a user may turn the hub back on)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def device():
    """Where stages put models: ``CPET_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``, ...) or, unset or
    ``auto``, the first CUDA GPU when one is usable, else the CPU. Nothing requires a GPU."""
    import torch

    want = os.environ.get("CPET_DEVICE", "auto").strip() or "auto"
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError as err:
        from cpet.errors import ConfigError

        raise ConfigError(f"CPET_DEVICE: {want!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        from cpet.errors import ConfigError

        raise ConfigError(f"CPET_DEVICE: {want!r} asked for, but torch sees no CUDA GPU")
    return dev


def bf16_native(dev) -> bool:
    """Whether ``dev`` (a torch device or its type) computes bfloat16 in hardware: a CUDA GPU that
    supports it, or a CPU with AVX512-BF16/AMX (oneDNN's check). Elsewhere autocast to bf16 is
    emulated and can be slower than float32."""
    import torch

    kind = getattr(dev, "type", str(dev))
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def use_bf16(mixed_precision: str, dev) -> bool:
    """Resolve a ``mixed_precision`` setting: ``bf16`` always, ``no`` never, ``auto`` where native."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and bf16_native(dev))


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (``accelerate launch``/``torchrun`` set ``RANK``), or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def cuda_devices() -> list[int]:
    """Every CUDA device torch sees (what ``torch.random.fork_rng`` saves and restores)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


#: Held around whatever uses or patches torch/transformers process-global state: the global RNG
#: (seeded init, a training run) and model construction (``from_pretrained``'s meta-device
#: context and ``no_init_weights`` patch ``torch.nn.init`` for every thread). Threads of one
#: process (the Prefect thread runner's fan-out) take turns; processes (Dask workers, DDP ranks)
#: have their own globals and run in parallel. Re-entrant.
TORCH_GLOBALS = threading.RLock()
