"""Promotion gates: thresholds from ``params.yaml: register.*_gates`` checked against a version's metrics.

Pure functions (no mlflow), so the rule can be read and tested on its own. A gate set to null is
off. A gate whose metric is missing or undefined (e.g. the recovery ratio when the original and
the vanilla adapter score the same) fails: promotion needs evidence, not its absence.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from cpet.config import GATES

_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class GateCheck:
    gate: str
    metric: str
    op: str
    threshold: float
    value: float | None

    @property
    def passed(self) -> bool:
        return self.value is not None and not math.isnan(self.value) and _OPS[self.op](self.value, self.threshold)

    def describe(self) -> str:
        """``"passed: accuracy 0.83 >= 0.75"`` / ``"failed: latency_ms 212 > 150"``."""
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        op = self.op if self.passed else {">=": "<", "<=": ">"}[self.op]
        return f"{'passed' if self.passed else 'failed'}: {self.metric} {shown} {op} {self.threshold:g}"


@dataclass(frozen=True)
class Decision:
    """The outcome for one model version: promoted iff every active gate passed."""

    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def tags(self) -> dict[str, str]:
        """Version tags: ``gates`` = passed|failed, ``gate.<name>`` per gate, ``gate_failed`` = names."""
        tags = {"gates": "passed" if self.passed else "failed"}
        tags.update({f"gate.{c.gate}": c.describe() for c in self.checks})
        if not self.passed:
            tags["gate_failed"] = ",".join(c.gate for c in self.failed)
        return tags


def check_gates(metrics: dict[str, float | None], gates: dict[str, float | None]) -> Decision:
    """Check every active gate (null threshold = off) against ``metrics``."""
    checks = []
    for gate, threshold in gates.items():
        if threshold is None:
            continue
        metric, op = GATES[gate]
        value = metrics.get(metric)
        checks.append(GateCheck(gate, metric, op, float(threshold), None if value is None else float(value)))
    return Decision(tuple(checks))
