"""Randomly initialised Llama-shaped models for benchmarks that must not download anything.

`save_random_llama(path, shape)` writes a bf16 safetensors model directory plus the byte-level ChatML
tokenizer (`slimtune.models.byte_tokenizer`), which `slimtune` and `transformers` load like any HF
model. Shapes:
- `1b`: TinyLlama's (hidden 2048, 22 layers, MLP 5632, 32 query / 4 key-value heads, vocab 32000),
  1.10B parameters, 2.1 GB in bf16;
- `tiny`: hidden 64, 2 layers, MLP 128, 4 / 2 heads, vocab 259 (the tokenizer's): a few hundred
  kB, for CPU dry runs (bitsandbytes' CPU 4-bit kernels need in_features >= 64).
"""

from __future__ import annotations

from pathlib import Path

SHAPES: dict[str, dict[str, int]] = {
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "tiny": {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def save_random_llama(path: Path, shape: str, device: str = "cpu", seed: int = 0) -> int:
    """Write the model (bf16 safetensors) and tokenizer to `path` unless already there; returns the
    parameter count. `device`: where the random initialisation runs (a GPU initialises 1B in a second)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.models.byte_tokenizer import byte_level_tokenizer

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    config.use_cache = False
    torch.manual_seed(seed)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file():
        return params
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(path)
    return params
