"""Pipeline stages: one function per stage, the same code for DVC (through the CLI) and Prefect.

A stage takes the typed :class:`~cpet.config.Params` and the project root, writes only under its
own outputs (atomically; under a distributed launch rank 0 alone writes) and returns a small
dict of metrics. A stage that fans out (one output per compression method, per task, ...) also
takes a keyword selecting one item; DVC runs one ``cpet <stage> --<keyword> <item>`` per item
(``foreach``) and the Prefect flow maps over them.
``ORDER`` is the DVC stage order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cpet import io
from cpet.config import Params
from cpet.env import is_main_process
from cpet.errors import ConfigError
from cpet.stages.bench import bench
from cpet.stages.compress import compress
from cpet.stages.evaluate import evaluate
from cpet.stages.export import export
from cpet.stages.fetch import fetch
from cpet.stages.inherit import inherit
from cpet.stages.recover import recover
from cpet.stages.register import register
from cpet.stages.teacher import teacher
from cpet.stages.validate import validate


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., dict]
    fan_out: str | None = None  # keyword selecting one item, e.g. "method"
    items: Callable[[Params], list[str]] | None = None  # every item, from the params

    def select(self, params: Params, **selector) -> str | None:
        """The one item asked for (None = all), refused unless the params configure it."""
        unknown = set(selector) - {self.fan_out}
        if unknown:
            raise ConfigError(f"stage {self.name}: no option {sorted(unknown)[0]!r}")
        item = selector.get(self.fan_out) if self.fan_out else None
        if item is not None and item not in self.items(params):
            raise ConfigError(f"stage {self.name}: no {self.fan_out} named {item!r}; "
                              f"configured: {', '.join(self.items(params))}")
        return item

    def __call__(self, params: Params, root, **selector) -> dict:
        """Run the stage inside its MLflow run (``track`` in params.yaml; see cpet.tracking).

        Under ``accelerate launch`` / ``torchrun`` every rank runs the stage (the trainer keeps
        them in step with DDP); rank 0 alone writes its outputs and its MLflow run."""
        from cpet.tracking import stage_run

        self.select(params, **selector)
        if not is_main_process():
            with io.discard_writes():
                return self.fn(params, root, **selector)
        with stage_run(params, root, self.name, next(iter(selector.values()), None)) as run:
            metrics = self.fn(params, root, **selector)
            if run is not None:
                run.finish(metrics)
        return metrics


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("fetch", fetch),
        Stage("validate", validate),
        Stage("compress", compress, "method", lambda p: list(p.compress.methods)),
        Stage("teacher", teacher, "task", lambda p: list(p.tasks)),
        Stage("inherit", inherit, "method", lambda p: p.recover_methods()),
        Stage("recover", recover, "method", lambda p: p.recover_methods()),
        Stage("evaluate", evaluate),
        Stage("export", export, "method", lambda p: p.recover_methods()),
        Stage("bench", bench),
        Stage("register", register),
    )
}
ORDER = tuple(STAGES)

__all__ = ["ORDER", "STAGES", "Stage"]
