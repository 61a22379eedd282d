"""The rows of the comparison (METHOD.md), as data: which of CPET's three ingredients each uses.

``inherit``: the compressed model's LoRA starts from the original model's adapter (sliced
through structured pruning) instead of peft's fresh init. ``recovery``: low-rank recovery modules
beside every compressed linear layer. ``distill``: the loss adds the hidden-state MSE and the KL
on the label scores against the uncompressed teacher (``recover.distill``). ``trained``: the
``recover`` stage trains it (``compressed+inherit-only`` is the inherited adapter as is, from
the ``inherit`` stage). ``original+pet`` (the teacher) is the reference row, not a recipe.
"""

from __future__ import annotations

from typing import NamedTuple


class Recipe(NamedTuple):
    inherit: bool
    recovery: bool
    distill: bool
    trained: bool = True


ORIGINAL = "original+pet"
PET, CPET, INHERIT_ONLY = "compressed+pet", "compressed+cpet", "compressed+inherit-only"

RECIPES: dict[str, Recipe] = {
    INHERIT_ONLY: Recipe(inherit=True, recovery=False, distill=False, trained=False),
    PET: Recipe(inherit=False, recovery=False, distill=False),
    "compressed+inherit": Recipe(inherit=True, recovery=False, distill=False),
    "compressed+recover": Recipe(inherit=False, recovery=True, distill=False),
    "compressed+inherit+recover": Recipe(inherit=True, recovery=True, distill=False),
    "compressed+inherit+distill": Recipe(inherit=True, recovery=False, distill=True),
    "compressed+recover+distill": Recipe(inherit=False, recovery=True, distill=True),
    CPET: Recipe(inherit=True, recovery=True, distill=True),
}

#: every row of results.json, in table order
VARIANTS: tuple[str, ...] = (ORIGINAL, *RECIPES)
#: what ``recover.variants`` may name
TRAINED: tuple[str, ...] = tuple(name for name, r in RECIPES.items() if r.trained)
