"""Base models: resolve a name (alias, HF directory, .gguf file, hub id) and load model + tokenizer."""

from slimtune.models.loader import BUNDLED_MODELS, load_model, resolve_model, slimtune_home

__all__ = ["BUNDLED_MODELS", "load_model", "resolve_model", "slimtune_home"]
