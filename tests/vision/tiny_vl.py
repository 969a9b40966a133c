"""Tiny randomly initialised vision-language models built from configs (no download), with processor
files made from the byte-level test tokenizer, and real PNG files written with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import make_tiny_tokenizer

# Qwen2-VL's chat template, reduced to what the tests need: content is a string or a list of parts.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> Path:
    """A real PNG file: a solid square of `color` with a contrasting diagonal, so images differ."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    draw.line((0, 0, size[0], size[1]), fill=(255 - color[0], 255 - color[1], 255 - color[2]), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _tokenizer_with(extra: list[str], template: str):
    tokenizer = make_tiny_tokenizer(template)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|pad|>", *extra]})
    return tokenizer


def _save_processor_files(path: Path, tokenizer, image_processor, processor_class: str, template: str,
                          **extra) -> None:
    """What `ProcessorMixin.save_pretrained` writes, without building the processor object (Qwen's needs
    torchvision for its video part, which this environment lacks; slimtune then loads it without videos)."""
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **extra}),
                                                encoding="utf-8")


def make_qwen_vl_dir(path: Path, seed: int = 0) -> Path:
    """A saved tiny Qwen2.5-VL (2 text layers, 2 vision blocks) with its processor files."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer_with(special, QWEN_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    _save_processor_files(path, tokenizer, image_processor, "Qwen2_5_VLProcessor", QWEN_TEMPLATE)
    return path


def make_llava_dir(path: Path, seed: int = 0) -> Path:
    """A saved tiny LLaVA (CLIP vision tower, 2-layer MLP projector, 2-layer Llama) with its processor files."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _tokenizer_with(["<image>"], LLAVA_TEMPLATE)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    _save_processor_files(path, tokenizer, image_processor, "LlavaProcessor", LLAVA_TEMPLATE, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return path
