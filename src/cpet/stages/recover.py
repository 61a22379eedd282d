"""Stage ``recover``: the trained variants of the comparison, all through one trainer.

Per compression method ``<m>``, task ``<t>`` and variant ``<v>`` in ``recover.variants``:
``models/recover/<m>/<t>/<v>/`` is a bundle (LoRA adapter + recovery modules, one
``load_bundle`` call); ``reports/curves/recover/<m>/<t>/<v>.json`` its learning curve. What each variant uses (inherited LoRA, recovery modules, distillation
from the uncompressed teacher's cached outputs) is its row of :data:`cpet.config.recipes.RECIPES`:
``compressed+pet`` none of them, ``compressed+cpet`` all three, the ablations the rest.
"""

from __future__ import annotations

from pathlib import Path

from cpet import io, paths
from cpet.config import Params
from cpet.config.recipes import RECIPES
from cpet.stages.common import (CURVES, checkpoint_dir, data_hashes, load_compressed_base, load_tokenizer, seeded_init,
                                task_identity, task_views, train_adapter)

OUT_DIR = Path("models") / "recover"
REPORT_DIR = Path("reports") / "recover"



def build_variant(params: Params, root: Path, method: str, task: str, variant: str):
    """The compressed model with the variant's trainable modules attached (untrained; their
    initial weights follow ``recover.train.seed``)."""
    from cpet.pet import attach_lora, attach_recovery, inherit_adapter

    recipe = RECIPES[variant]
    model, kept = load_compressed_base(root, method)
    with seeded_init(params.recover.train.seed):
        if recipe.recovery:
            model = attach_recovery(model, params.recover.recovery)
        if recipe.inherit:
            return inherit_adapter(paths.require(root, paths.teacher_adapter(task)), model, kept)
        return attach_lora(model, params.teacher.lora)


def variant_inputs(params: Params, root: Path, task: str, variant: str) -> dict:
    """What a variant's recipe reads beyond the compressed model and the task: the inherited
    teacher adapter, the LoRA settings of a fresh one, recovery settings, the teacher cache and
    the distillation weights."""
    recipe = RECIPES[variant]
    teacher = root / paths.teacher(task)
    inputs: dict = {"variant": variant,
                    "lora": io.tree_hash(teacher / "adapter") if recipe.inherit else params.teacher.lora.model_dump()}
    if recipe.recovery:
        inputs["recovery"] = params.recover.recovery.model_dump()
    if recipe.distill:
        inputs["distill"] = params.recover.distill.model_dump()
        inputs["teacher_cache"] = io.sha256_file(teacher / "cache.safetensors")
    return inputs


def recover(params: Params, root: str | Path = ".", method: str | None = None) -> dict:

    from cpet.distill import DistillLoss, TeacherCache
    from cpet.pet import save_bundle

    root = Path(root)
    tokenizer = load_tokenizer(root)
    views = task_views(params, root, tokenizer)
    for view in views:  # what the variants read from the teacher, checked before any training
        if any(RECIPES[v].inherit for v in params.recover.variants):
            paths.require(root, paths.teacher_adapter(view.name))
        if any(RECIPES[v].distill for v in params.recover.variants):
            paths.require(root, paths.teacher_cache(view.name))
    config = params.recover.train
    out: dict = {}
    for name in params.recover_methods():
        if method not in (None, name):
            continue
        metrics: dict = {}
        with io.atomic_dir(root / OUT_DIR / name) as tmp, io.atomic_dir(root / CURVES / "recover" / name) as curves:
            compressed = io.tree_hash(root / paths.compressed(name))
            for view in views:
                common = {"compressed": compressed, **task_identity(view),
                          "data": data_hashes(root, view.name), "train": config.model_dump()}
                for variant in params.recover.variants:
                    model = build_variant(params, root, name, view.name, variant)
                    loss_fn = None
                    if RECIPES[variant].distill:
                        cache = TeacherCache.load(paths.require(root, paths.teacher_cache(view.name)))
                        loss_fn = DistillLoss(view.verbalizer, params.recover.distill, cache=cache)
                    ckpt = checkpoint_dir(params, root, "recover", name, view.name, variant,
                                          inputs={**common, **variant_inputs(params, root, view.name, variant)})
                    print(f"recover[{name}] {view.name} {variant}", flush=True)
                    result, history = train_adapter(model, tokenizer, view, config, ckpt, loss_fn)
                    save_bundle(model, tmp / view.name / variant)
                    io.write_json(curves / view.name / f"{variant}.json", history)
                    metrics.setdefault(view.name, {})[variant] = result
        io.write_json(root / REPORT_DIR / f"{name}.json", metrics)
        out[name] = metrics
    return out
