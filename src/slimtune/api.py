"""The Python API: each CLI command is a thin layer over one of these functions.

They live by purpose: `finetune` (the four stages) in finetune.py, finished runs in runs.py, merging in
merge.py, evaluation of a run in evaluate_run.py; `generate` is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slimtune.data import Message
from slimtune.data.images import resolve_ref, text_only
from slimtune.data.vision_render import VisionRenderer
from slimtune.evaluate import generate_replies
from slimtune.evaluate_run import evaluate_run
from slimtune.stages import TrainResult, check_run, finetune
from slimtune.merge import MERGE_REPORT, merge_run
from slimtune.runs import EVAL_METRICS, EVAL_REPORT, RUN_CONFIG, load_run, open_run, run_config, run_method


def generate(model, tokenizer, prompt: str | list[Message], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, system: str | None = None,
             images: Sequence[str | Path] = (), processor=None, image_max_pixels: int | None = None) -> str:
    """One reply to `prompt` (a user message, or a whole conversation), greedy unless temperature > 0.

    `images` (paths or data: URLs) go before the text of a string prompt; they, and image parts in a
    conversation, need the vision-language model's `processor`."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if images and isinstance(prompt, str):
        refs = [resolve_ref(str(image), "--image", "--image") for image in images]
        messages = [{"role": "user", "content": [*({"type": "image", "image": r} for r in refs),
                                                  {"type": "text", "text": prompt}]}]
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if processor is None:
        messages = text_only(messages, "--image" if images else "prompt", "the run's base model")
        return generate_replies(model, tokenizer, [messages], max_new_tokens, 1, temperature, top_p)[0]
    renderer = VisionRenderer(processor, image_max_pixels)
    return generate_replies(model, tokenizer, [messages], max_new_tokens, 1, temperature, top_p, renderer=renderer)[0]


__all__ = ["EVAL_METRICS", "EVAL_REPORT", "MERGE_REPORT", "RUN_CONFIG", "TrainResult", "check_run", "evaluate_run",
           "finetune", "generate", "load_run", "merge_run", "open_run", "run_config", "run_method"]
