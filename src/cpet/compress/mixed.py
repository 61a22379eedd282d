"""``mixed``: several methods in a fixed order, e.g. structured pruning then int8.

The order (structured, moe, pruning, quantization; each kind at most once) is checked when
the config is parsed. Each step works on the model the previous one left, so a quantization
step quantizes the shrunken matrices, expert slices or already-masked weights (masked weights
stay exactly zero: they are stored at the zero level).
"""

from __future__ import annotations

from cpet.compress.config import MixedConfig
from cpet.compress.core import Calibration, CompressedModel, apply_step
from cpet.compress.registry import Method, register


def apply_mixed(cm: CompressedModel, cfg: MixedConfig, calib: Calibration | None) -> None:
    for step in cfg.steps:
        apply_step(cm, step, calib)


register(Method("mixed", MixedConfig, apply_mixed, None, "an ordered list of the other methods"))
