"""The recovery layer: a peft ``BaseTunerLayer`` wrapping one ``nn.Linear``.

Per-adapter state lives in ``nn.ModuleDict``s keyed by adapter name, as in peft's LoRA, so a
LoRA layer can wrap this layer (or the other way round) without touching ``forward``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from cpet.compress.arch import projection

#: activation registry: name -> (module factory, mergeable)
ACTIVATIONS: dict[str, tuple[type[nn.Module], bool]] = {
    "gelu": (nn.GELU, False),
    "identity": (nn.Identity, True),
}


class RecoveryLayer(BaseTunerLayer):
    """Adds ``B_rec act(A_rec x) * scaling`` for every active recovery adapter."""

    adapter_layer_names = ("rec_A", "rec_B")
    other_param_names = ("r", "scaling", "act")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.rec_A = nn.ModuleDict({})
        self.rec_B = nn.ModuleDict({})
        self.act = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = projection(self.get_base_layer())  # nn.Linear or Conv1D: features in one orientation
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, r: int, alpha: float, act: str) -> None:
        """Create adapter ``adapter_name``: A_rec Kaiming-uniform like LoRA's A, B_rec zero."""
        weight = projection(self.get_base_layer()).weight
        self.rec_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.rec_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.act[adapter_name] = ACTIVATIONS[act][0]()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        nn.init.kaiming_uniform_(self.rec_A[adapter_name].weight, a=5**0.5)
        nn.init.zeros_(self.rec_B[adapter_name].weight)
        self.rec_A[adapter_name].to(weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.rec_B[adapter_name].to(weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.set_adapter(self.active_adapters)

    def mergeable(self, adapter_name: str) -> bool:
        return isinstance(self.act[adapter_name], nn.Identity)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B_rec A_rec * s`` (only meaningful for the identity activation)."""
        if not self.mergeable(adapter_name):
            raise ValueError(f"recovery adapter {adapter_name!r} has a non-linear activation: not mergeable")
        a, b = self.rec_A[adapter_name].weight, self.rec_B[adapter_name].weight
        return (b @ a) * self.scaling[adapter_name]


class Linear(nn.Module, RecoveryLayer):
    """Recovery modules around a projection (``nn.Linear``, ``Conv1D``; or a tuner layer wrapping one)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float, act: str, **kwargs) -> None:
        super().__init__()
        RecoveryLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, act)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.rec_A:
                continue
            w = projection(self.get_base_layer()).weight.data  # [out, in] view of the stored weight
            merged = w + self.get_delta_weight(name).to(w.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs when merging recovery adapter {name!r}")
            w.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = projection(self.get_base_layer()).weight.data
            w -= self.get_delta_weight(name).to(w.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.rec_A:
                continue
            a = self.rec_A[name]
            h = self.act[name](a(x.to(a.weight.dtype)))
            result = result + (self.rec_B[name](h) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "rec." + super().__repr__()
