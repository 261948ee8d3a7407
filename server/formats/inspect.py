"""`modeldeploy inspect PATH`: what a model file or directory is, as JSON.

`inspect_path` is the one description of a model; GET /model and GET /tensors serve the same
dict. It never reads tensor data, so it answers in well under a second even for a
half-gigabyte GGUF, and long metadata arrays (a 152k-token vocabulary) are summarized.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats import ModelFiles, ModelFormat, load_sibling_json, open_model_files

#: arrays longer than this are summarized (length, item type, first items)
ARRAY_SUMMARY_THRESHOLD = 16
ARRAY_HEAD = 8


def summarize_value(value: Any) -> Any:
    """A JSON-ready metadata value: long arrays become {"type","length","item_type","head"}."""
    if isinstance(value, np.ndarray):
        if value.size > ARRAY_SUMMARY_THRESHOLD:
            return {
                "type": "array",
                "length": int(value.size),
                "item_type": str(value.dtype),
                "head": value[:ARRAY_HEAD].tolist(),
            }
        return value.tolist()
    if isinstance(value, list):
        if len(value) > ARRAY_SUMMARY_THRESHOLD:
            first = value[0] if value else None
            return {
                "type": "array",
                "length": len(value),
                "item_type": type(first).__name__ if not isinstance(first, np.ndarray) else "array",
                "head": [summarize_value(v) for v in value[:ARRAY_HEAD]],
            }
        return [summarize_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _gguf_section(files: ModelFiles) -> dict[str, Any]:
    gf = files.gguf
    assert gf is not None
    meta = gf.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "metadata": {k: summarize_value(v) for k, v in meta.items()},
        "gguf": {
            "version": gf.version,
            "alignment": gf.alignment,
            "data_offset": gf.data_offset,
            "file_size": gf.file_size,
            "quant_types": dict(Counter(t.type_name for t in gf.tensors).most_common()),
        },
        "has_chat_template": gf.chat_template is not None,
        "has_tokenizer": isinstance(tokens, list) and len(tokens) > 0,
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tensors": [
            {
                "name": t.name,
                "dtype": t.type_name,
                "shape": list(t.shape),
                "bytes": t.n_bytes,
            }
            for t in gf.tensors
        ],
    }


def _safetensors_section(files: ModelFiles) -> dict[str, Any]:
    st = files.safetensors
    assert st is not None
    return {
        "metadata": {
            "safetensors": st.metadata,
            "config.json": st.config,
        },
        "files": [str(f) for f in st.files],
        "dtypes": dict(Counter(t.dtype for t in st.tensors.values()).most_common()),
        "has_chat_template": _hf_has_chat_template(files.model_dir),
        "has_tokenizer": (files.model_dir / "tokenizer.json").is_file(),
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "file": t.file.name,
            }
            for t in st.tensors.values()
        ],
    }


def _hf_has_chat_template(model_dir: Path) -> bool:
    if any(model_dir.glob("chat_template.*")):
        return True
    try:
        data = load_sibling_json(model_dir, "tokenizer_config.json")
    except FormatError:
        return False  # the weights are still worth describing; serving will say what is wrong
    return bool(data and data.get("chat_template"))


def describe(files: ModelFiles) -> dict[str, Any]:
    """The JSON description of an opened model (what `inspect` prints)."""
    section = (
        _gguf_section(files) if files.format is ModelFormat.GGUF else _safetensors_section(files)
    )
    tensors = section["tensors"]
    return {
        "path": str(files.path),
        "format": files.format.value,
        "architecture": files.config.architecture if files.config else files.architecture,
        "supported": files.config is not None,
        "config": files.config.to_dict() if files.config else None,
        "has_chat_template": section.pop("has_chat_template"),
        "has_tokenizer": section.pop("has_tokenizer"),
        "tensor_count": len(tensors),
        "total_bytes": sum(t["bytes"] for t in tensors),
        **section,
    }


def inspect_path(path: str | Path, quant: str | None = None) -> dict[str, Any]:
    """Describe the model at `path` (file or directory); FormatError for anything unreadable.

    An architecture we cannot serve is still described, with `supported: false` and no config.
    """
    return describe(open_model_files(path, quant, strict=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="a .gguf, .safetensors, *.safetensors.index.json or a model dir"
    )
    parser.add_argument("--quant", help="in a directory with several .gguf files, pick this one")
    parser.add_argument(
        "--no-tensors", action="store_true", help="leave the tensor list out of the output"
    )


def run(args: argparse.Namespace) -> int:
    info = inspect_path(args.path, args.quant)
    if args.no_tensors:
        info.pop("tensors")
    json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
