"""Quiet, offline-friendly defaults: no telemetry, no hub calls, unless the user set otherwise."""

import os

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
