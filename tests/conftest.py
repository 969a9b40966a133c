"""Shared fixtures: a tiny random Llama with a byte-level ChatML tokenizer, and the bundled model.

Unit tests use the tiny model (milliseconds per step). Tests marked `integration` use the bundled
SmolLM2-135M-Instruct, converted once per machine into the slimtune cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune.models.byte_tokenizer import CHATML, byte_level_tokenizer


def make_tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer with no merges (one token per byte) plus ChatML special tokens."""
    return byte_level_tokenizer(chat_template)


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


def make_wide_tiny_llama():
    """A bf16 Llama wide enough (hidden 256, MLP 768, 3 layers, GQA 8/2 heads) that its activations
    dominate what a step keeps, in training mode without a cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def bytes_kept_for_backward(model, batch_size: int, length: int, backward: bool = False) -> int:
    """Bytes autograd keeps for backward (`saved_tensors_hooks`, one count per storage, the parameters'
    own left out) in one bf16-autocast response-loss forward of `model` on random ids; `backward` then
    runs its backward too (a compiled layer's backward graph is traced there)."""
    from slimtune.train.loss import response_loss_sum

    ids = torch.randint(0, model.config.vocab_size, (batch_size, length))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = response_loss_sum(model, batch, chunk=10**6)
    if backward:
        loss.backward()
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def write_repeat_data(path: Path, count: int) -> Path:
    """`count` Alpaca rows "repeat i" -> "wordi " repeated 1-3 times, as JSONL at `path`."""
    rows = [{"instruction": f"repeat {i}", "output": ("word%d " % i) * (1 + i % 3)} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    """A 12-row Alpaca training file for quick runs on the tiny model."""
    return write_repeat_data(tmp_path / "train.jsonl", 12)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model directory (safetensors + tokenizer) that `load_model(path)` accepts."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a HF directory (converted once into the cache)."""
    from slimtune.models import resolve_model

    return Path(resolve_model("smollm2-135m"))
