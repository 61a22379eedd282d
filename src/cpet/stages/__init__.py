"""Pipeline stages: one function per stage, the same code for DVC (through the CLI) and Prefect.

A stage takes the typed :class:`~cpet.config.Params` and the project root, writes only under its
own outputs (atomically) and returns a small dict of metrics. ``ORDER`` is the DVC stage order.
"""

from cpet.stages.fetch import fetch
from cpet.stages.validate import validate

STAGES = {"fetch": fetch, "validate": validate}
ORDER = tuple(STAGES)

__all__ = ["ORDER", "STAGES"]
