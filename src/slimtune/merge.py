"""Merge a finished run into its base: a plain Hugging Face model directory.

W' = W + s B A for LoRA (AdaLoRA as the LoRA it equals), m (W + s B A) / ||W + s B A|| for DoRA,
dequantize(W_nf4) + s B A for QLoRA, base + trained tensors for freeze, a copy for full. A vision-language
model's processor files are copied beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from slimtune.atomic import reported_write_failures, staged_directory
from slimtune.errors import AdapterError, SlimtuneError
from slimtune.quant import Linear4bit
from slimtune.runs import open_run

MERGE_REPORT = "slimtune_merge.json"  # written for a QLoRA run: merged vs 4-bit outputs


_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
                    "video_preprocessor_config.json")


def save_processor_files(run_dir: str | Path, out: Path) -> None:
    """A vision-language base's processor files (image processor, chat template) beside the merged weights,
    so the merged directory loads with `AutoProcessor` as the base did; nothing for a text-only base."""
    from slimtune.models.loader import resolve_model
    from slimtune.models.vision import processor_for, processor_source

    source = processor_source(run_dir)
    base = Path(resolve_model(source))
    processor = processor_for(str(base), source)
    if processor is None:
        return
    if base.is_dir():
        for name in _PROCESSOR_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, out / name)
    else:
        processor.save_pretrained(out)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the run into its base and save a plain HF model directory at `out_dir` (a new directory)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"merge output '{out}' exists and is not a directory: choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise SlimtuneError(f"merge output '{out}' is not empty: choose a new directory")
    model, tokenizer, attached = open_run(run_dir)
    quantized_logits = None
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        # QLoRA: probe the unmerged 4-bit model first to report what dequantizing changes.
        probe = tokenizer("The merge check: one two three four five.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            quantized_logits = model(input_ids=probe).logits.float()
    model = attached.merged()
    broken = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if broken:
        raise AdapterError(f"cannot merge '{run_dir}': {len(broken)} tensors hold NaN or inf (e.g. {broken[:2]}); "
                           "the run is broken")
    report = None
    if quantized_logits is not None:
        with torch.no_grad():
            merged_logits = model(input_ids=probe).logits.float()
        report = {"source": str(run_dir), "probe_tokens": int(probe.shape[1]),
                  "max_abs_prob_diff_vs_unmerged_nf4": float(
                      (merged_logits.softmax(-1) - quantized_logits.softmax(-1)).abs().max())}
    if dtype is not None:
        model.to(dtype)
    model.config.use_cache = True
    # Written beside the target and renamed: an interrupted merge never leaves a half-written model.
    with reported_write_failures(f"the merged model to '{out}'", "run the merge again (nothing was left behind)"), \
            staged_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        save_processor_files(run_dir, staging)
        if report is not None:
            (staging / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out
