"""A byte-level tokenizer that needs no download: one token per byte plus ChatML special tokens.

For randomly initialised models (tests, the GPU check, load benchmarks), where any tokenizer works and
none may be fetched: 256 byte tokens (the GPT-2 byte alphabet, no merges), then <|im_start|>,
<|im_end|> (end of a turn, the eos) and <|pad|>, and a ChatML chat template.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(chat_template: str | None = CHATML):
    """A `PreTrainedTokenizerFast` with 259 tokens (see the module docstring); no chat template if None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|pad|>"]})
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer
