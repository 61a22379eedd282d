"""Library settings for tests: params.yaml's values (the project's one set of defaults) plus overrides.

``lora_settings(rank=4)`` is ``teacher.lora`` of params.yaml with ``rank`` replaced, and so on:
tests never rely on defaults written in code, so a value missing from params.yaml is caught by the
config tests, not hidden by a code default.
"""

from __future__ import annotations

from pathlib import Path

import yaml

_RAW = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def lora_settings(**overrides):
    from cpet.pet import LoraSettings

    return LoraSettings(**{**_RAW["teacher"]["lora"], **overrides})


def recovery_settings(**overrides):
    from cpet.pet import RecoverySettings

    return RecoverySettings(**{**_RAW["recover"]["recovery"], **overrides})


def train_config(**overrides):
    """``recover.train`` in float32 with the model's own attention (tiny test models), + overrides."""
    from cpet.train import TrainConfig

    return TrainConfig(**{**_RAW["recover"]["train"], "mixed_precision": "no", "attn_implementation": None,
                          **overrides})


def distill_config(**overrides):
    from cpet.distill import DistillConfig

    return DistillConfig(**{**_RAW["recover"]["distill"], **overrides})
