"""Model formats: what a path holds, validated, with one normalized config for the engine.

    files = open_model("/models/qwen.gguf")        # or an HF dir, a .safetensors, an index
    files.format, files.config.num_layers, files.gguf.raw("token_embd.weight")

Nothing here imports torch, so `inspect` and the operator-side checks stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats.config import NormalizedConfig, config_from_gguf, config_from_hf
from modeldeploy.server.formats.detect import ModelFormat, detect_format, resolve_model_path
from modeldeploy.server.formats.gguf_file import GGUFFile
from modeldeploy.server.formats.safetensors_model import (
    SafeTensorsModel,
    load_sibling_config,
    load_sibling_json,
)

__all__ = [
    "GGUFFile",
    "ModelFiles",
    "ModelFormat",
    "NormalizedConfig",
    "SafeTensorsModel",
    "config_from_gguf",
    "config_from_hf",
    "detect_format",
    "load_sibling_config",
    "load_sibling_json",
    "open_model",
    "open_model_files",
    "resolve_model_path",
]


@dataclass
class ModelFiles:
    """An opened, validated model: the weights file, its format and its normalized config.

    `model_dir` is where the sibling files live (tokenizer.json, tokenizer_config.json,
    generation_config.json). Exactly one of `gguf` / `safetensors` is set. `config` is None only
    from `open_model_files(..., strict=False)` for an architecture we do not implement.
    """

    format: ModelFormat
    path: Path
    config: NormalizedConfig | None
    gguf: GGUFFile | None
    safetensors: SafeTensorsModel | None
    model_dir: Path
    architecture: str | None = None


def _merge_generation_eos(config: NormalizedConfig, model_dir: Path) -> NormalizedConfig:
    """generation_config.json often lists more stop ids than config.json (Qwen, Llama 3)."""
    gen = load_sibling_json(model_dir, "generation_config.json")
    if not gen:
        return config
    extra = gen.get("eos_token_id")
    ids = list(config.eos_token_ids)
    for i in extra if isinstance(extra, list) else [extra]:
        if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
            ids.append(i)
    return replace(config, eos_token_ids=ids)


def _check_embedding(config: NormalizedConfig, shape: tuple[int, ...] | None, where: str) -> None:
    if shape is not None and tuple(shape) != (config.vocab_size, config.hidden_size):
        raise FormatError(
            f"{where}: embedding shape {list(shape)} does not match the config "
            f"(vocab {config.vocab_size} x hidden {config.hidden_size})"
        )


def open_model_files(
    path: str | Path, quant: str | None = None, *, strict: bool = True
) -> ModelFiles:
    """Resolve, detect, open and validate; with strict=False an unsupported architecture
    yields `config=None` instead of an error (what `inspect` wants)."""
    from modeldeploy.server.errors import UnsupportedArchitectureError

    resolved = resolve_model_path(path, quant)
    fmt = detect_format(resolved)
    if fmt is ModelFormat.GGUF:
        gf = GGUFFile.open(resolved)
        try:
            config = config_from_gguf(
                gf.metadata, (t.name for t in gf.tensors), source=str(resolved)
            )
        except UnsupportedArchitectureError:
            if strict:
                raise
            config = None
        if config is not None and "token_embd.weight" in gf:
            _check_embedding(config, gf.tensor("token_embd.weight").shape, str(resolved))
        return ModelFiles(fmt, resolved, config, gf, None, resolved.parent, gf.architecture)
    st = SafeTensorsModel.open(resolved)
    model_dir = resolved.parent
    if st.config is None:
        if strict:
            raise FormatError(f"{model_dir}: no config.json next to the SafeTensors weights")
        return ModelFiles(fmt, resolved, None, None, st, model_dir, None)
    try:
        config = config_from_hf(st.config, source=str(model_dir / "config.json"))
    except UnsupportedArchitectureError:
        if strict:
            raise
        return ModelFiles(fmt, resolved, None, None, st, model_dir, st.config.get("model_type"))
    config = _merge_generation_eos(config, model_dir)
    embed = st.tensors.get("model.embed_tokens.weight")
    _check_embedding(config, embed.shape if embed else None, str(resolved))
    return ModelFiles(fmt, resolved, config, None, st, model_dir, config.architecture)


def open_model(path: str | Path, quant: str | None = None) -> ModelFiles:
    """Open the model at `path` (file or directory) for serving; refuse anything we cannot
    serve with a FormatError / UnsupportedArchitectureError naming the file and the reason."""
    return open_model_files(path, quant, strict=True)
