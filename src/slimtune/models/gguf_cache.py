"""Convert a GGUF file once into a cached, trainable safetensors model directory.

transformers can read GGUF files, but it dequantizes every tensor on each load (~20 s for a 135M model)
and marks the model as quantized, which makes it refuse training. We convert once: load through
transformers' GGUF reader, drop the quantization marker, and save a plain HF directory under
`$SLIMTUNE_HOME/models/<stem>-<hash>`. Later loads read safetensors in well under a second.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from slimtune.atomic import staged_directory
from slimtune.errors import ModelLoadError

_DONE_MARKER = ".slimtune-converted"


def slimtune_home() -> Path:
    """Cache root: `$SLIMTUNE_HOME`, default `~/.cache/slimtune`."""
    return Path(os.environ.get("SLIMTUNE_HOME") or Path.home() / ".cache" / "slimtune")


def _file_digest(path: Path) -> str:
    """Short content hash, so a changed file at the same path gets a new cache entry."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def cached_gguf_dir(gguf_path: Path) -> Path:
    """Where the conversion of `gguf_path` lives (it may not exist yet)."""
    return slimtune_home() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """Return a cached HF model directory holding `gguf_path`'s weights, converting on first use.

    The conversion writes into a temporary directory beside the target and renames it into place,
    so an interrupted conversion never leaves a half-written cache entry behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file '{gguf_path}' does not exist: check the path")
    target = cached_gguf_dir(gguf_path)
    if (target / _DONE_MARKER).is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"slimtune: converting {gguf_path.name} once to {target} (later loads take seconds)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUF variants
        raise ModelLoadError(
            f"could not read GGUF file '{gguf_path}': {exc}. transformers supports GGUF for llama, "
            "mistral, qwen2, phi3, gemma and a few more architectures"
        ) from None
    # The weights are dequantized to fp32 now; the marker would make transformers refuse to train.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    return _save_marked(model, tokenizer, target, str(gguf_path))


def _save_marked(model, tokenizer, target: Path, origin: str) -> Path:
    """Save model + tokenizer as `target`, whole or not at all; the marker file (written last, in the
    staged directory) is what makes a cache entry count. Replaces a stale, unmarked directory."""
    with staged_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(origin + "\n", encoding="utf-8")
    return target


def bf16_variant(model_dir: str | Path) -> Path | None:
    """For a directory this module converted, a bf16 copy beside it (made once); else None.

    Loading fp32 safetensors into a bf16 model maps the whole fp32 file and converts it, which makes
    the peak memory of a bf16 run ~3x the bf16 weights. A bf16 copy loads at the size of the weights.
    Rounding to bf16 is exactly what loading with dtype=bfloat16 does, so the weights are identical.
    """
    source = Path(model_dir)
    if not (source / _DONE_MARKER).is_file():
        return None
    target = source.with_name(source.name + "-bf16")
    if (target / _DONE_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return _save_marked(model, tokenizer, target, f"bf16 copy of {source}")
