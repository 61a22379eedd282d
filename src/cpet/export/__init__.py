"""Deployment of task bundles: exact side-path form, ONNX export with MatMulNBits, parity checks.

Importing this package imports torch and peft but not onnx/optimum/onnxruntime (loaded on use).
"""

from cpet.export.parity import check, label_scores, parity, scored_logits, torch_last_logits, torch_position_logits
from cpet.export.sidepath import (LowRank, SharedA, SharedSides, SideLinear, SidePath, deploy_model, layer_terms,
                                  plain_model, share_inputs)

__all__ = ["LowRank", "SharedA", "SharedSides", "SideLinear", "SidePath", "check", "deploy_model", "label_scores",
           "layer_terms", "parity", "plain_model", "scored_logits", "share_inputs", "torch_last_logits",
           "torch_position_logits"]
