"""Build a small LLaVA-style vision-language model around the bundled SmolLM2-135M-Instruct.

    64x64 image -> CLIP vision tower (random init, 2 layers, hidden 128, 16x16 patches -> 16 features)
                -> LLaVA projector (random init, MLP 128 -> 576 -> 576)
                -> SmolLM2-135M-Instruct (its real weights), where the 16 features replace the
                   16 `<image>` placeholder embeddings of the prompt.

Only the language side has real weights: no vision-language weights ship in a package that installs
offline, so the tower and the projector start random and are trained from scratch, together with LoRA
on the language model (the LLaVA / SmolVLM recipe; see examples/shapes_vl.yaml).

The directory written is a plain transformers model (`LlavaForConditionalGeneration`, safetensors)
with its processor files: the CLIP image processor, the bundled tokenizer with `<image>` added (the
embedding matrix grows by that one row, initialised to the mean embedding) and a ChatML chat template
that renders image content parts as `<image>`. The template is SmolLM2's without its default system
prompt (20 tokens fewer per example on a 2-core CPU).

Usage:
    python examples/make_vl_model.py [--out out/shapes-vl-base] [--seed 0]
        [--text-model smollm2-135m] [--vision-layers 2] [--vision-hidden 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 64, 16
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_vl_model(out: Path, text_model: str = "smollm2-135m", seed: int = 0, vision_layers: int = 2,
                   vision_hidden: int = 128) -> Path:
    """Write the model + processor files to `out` and return it."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration)

    from slimtune.models.loader import resolve_model

    text_dir = resolve_model(text_model)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    language = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32, use_safetensors=True)
    old_rows = language.get_input_embeddings().weight.shape[0]
    language.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, projection_dim=vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=language.config.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=language.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # The language side: the bundled model's weights, every tensor accounted for.
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)  # raises on any mismatch
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(language.lm_head.weight.data)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "patch_size": PATCH_SIZE, "image_token": IMAGE_TOKEN,
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}), encoding="utf-8")
    print(f"wrote {out}: {text_model} ({old_rows} -> {len(tokenizer)} token rows) + random CLIP tower "
          f"({vision_layers} layers, hidden {vision_hidden}, {IMAGE_SIZE}px / {PATCH_SIZE}px patches) + projector")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/shapes-vl-base"))
    parser.add_argument("--text-model", default="smollm2-135m",
                        help="the language model: the bundled alias or a local HF Llama-family directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--vision-hidden", type=int, default=128)
    args = parser.parse_args()
    build_vl_model(args.out, args.text_model, args.seed, args.vision_layers, args.vision_hidden)


if __name__ == "__main__":
    main()
