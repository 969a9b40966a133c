"""Vision-language models: which models have images, their processor, and the parts of the model.

A vision-language model (Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 / SmolVLM ...) is a language model
whose input embeddings get image features at the image placeholder tokens:

    image -> vision tower (a ViT) -> projector (an MLP) -> features that replace the placeholder
    embeddings -> the language model, whose head predicts the text.

transformers builds them with `AutoModelForImageTextToText` and renders conversations and images with
the model's `AutoProcessor`. A model is a vision-language model when its config has a `vision_config`.

Parts, found by module names that the families share (no family table to keep up to date):
- the *tower*: `vision_tower` / `vision_model`, or the children of Qwen's `visual` except its `merger`;
- the *projector*: `multi_modal_projector` (LLaVA), `connector` (Idefics3), `visual.merger` (Qwen).
Everything else is the language model (and its head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from slimtune.errors import ModelLoadError
from slimtune.section import Section

_TOWER_NAMES = ("vision_tower", "vision_model")
_PROJECTOR_NAMES = ("multi_modal_projector", "connector")
Part = Literal["tower", "projector"]
Training = Literal["frozen", "lora", "full"]


class VisionSettings(Section):
    """What of a vision-language model trains besides the language model (LoRA methods)."""

    train_tower: Training = Field(
        "frozen", description="The vision tower: frozen (false), lora (adapters on its linear layers, saved in the "
        "adapter file) or full (every weight, saved as PEFT modules_to_save).")
    train_projector: Training = Field(
        "frozen", description="The projector from image features to the language model: frozen (false), lora or full.")

    @field_validator("train_tower", "train_projector", mode="before")
    @classmethod
    def _false_is_frozen(cls, value: Any) -> Any:
        if value is False:
            return "frozen"
        if value is True:
            raise ValueError("say how to train it: lora or full (false keeps it frozen)")
        return value


def is_vision_config(config: Any) -> bool:
    """True for a vision-language model's config (it has a vision part)."""
    return getattr(config, "vision_config", None) is not None


def auto_model_class(config: Any):
    """`AutoModelForImageTextToText` for a vision-language config, else `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def is_vision_model(model: nn.Module) -> bool:
    return is_vision_config(getattr(model, "config", None))


def _image_only_processor(resolved: str, trust_remote_code: bool):
    """The model's processor class built without its video processor.

    transformers' Qwen2-VL / Qwen2.5-VL processors also hold a video processor, which needs torchvision;
    images alone need only the image processor (PIL), so without torchvision we build the processor with
    no video part (a video input would then fail, images and text work as usual)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from slimtune.models.skeleton import model_config

    class_name = PROCESSOR_MAPPING_NAMES.get(model_config(resolved, trust_remote_code).model_type)
    processor_class = getattr(transformers, class_name) if class_name else None
    if processor_class is None:
        raise ValueError("transformers knows no processor for this model type")

    class ImageOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = processor_class.__name__
    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    template = next((path.read_text(encoding="utf-8") for path in (Path(resolved) / "chat_template.jinja",)
                     if path.is_file()), None) or getattr(tokenizer, "chat_template", None)
    kwargs = {"video_processor": None} if "video_processor" in processor_class.get_attributes() else {}
    return ImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(resolved), tokenizer=tokenizer,
                              chat_template=template, **kwargs)


def load_processor(resolved: str, name: str | None = None, trust_remote_code: bool = False):
    """The `AutoProcessor` of a vision-language model (tokenizer + image processor + chat template), with
    a pad token (the EOS token if the model defines none)."""
    from transformers import AutoProcessor

    try:
        try:
            processor = AutoProcessor.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        except ImportError:  # e.g. a video processor that needs torchvision: images do not
            processor = _image_only_processor(resolved, trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        raise ModelLoadError(f"could not load the processor of vision-language model '{name or resolved}': {exc}; "
                             "the model directory needs its processor files (preprocessor_config.json, tokenizer)"
                             ) from None
    if not hasattr(processor, "image_processor") or getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"the processor of model '{name or resolved}' has no image processor or no chat "
                             "template: add preprocessor_config.json and chat_template.jinja to the model directory")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def processor_for(resolved: str, name: str | None = None):
    """The processor of `resolved` if it is a vision-language model, else None (reads only config.json)."""
    from slimtune.models.skeleton import model_config

    return load_processor(resolved, name) if is_vision_config(model_config(resolved)) else None


def vision_problems(cfg: Any, is_vision: bool) -> list[str]:
    """Config keys that do not fit the model's kind (checked before any weight loads)."""
    trained = [f"vision.{key}: {value}" for key, value in (("train_tower", cfg.vision.train_tower),
                                                           ("train_projector", cfg.vision.train_projector))
               if value != "frozen"]
    if not is_vision:
        return [f"{item}, but model '{cfg.model}' is text-only (no vision config): remove it" for item in trained]
    problems = []
    if cfg.train.packing:
        problems.append("train.packing: true is not supported for vision-language models (image positions are "
                        "per example): set train.packing=false")
    if trained and cfg.plugin.sections.get("lora", ()) is not None:  # only the plain LoRA family reads it
        problems.append(f"{trained[0]} applies to the LoRA methods (lora, qlora, dora); method: {cfg.method} "
                        "chooses its trained parameters itself: remove it")
    return problems


def processor_source(run_dir: str | Path, model: str | None = None) -> str:
    """The model a run's processor comes from: its base; a whole model saved without its run config
    (method: full through the API) is its own base."""
    from slimtune.errors import AdapterError
    from slimtune.runs import base_model_name

    try:
        return base_model_name(run_dir, model)
    except AdapterError:
        if (Path(run_dir) / "config.json").is_file():
            return str(run_dir)
        raise


def run_processor(run_dir: str | Path, model: str | None = None):
    """The processor of a run's base model if it is a vision-language model, else None."""
    from slimtune.models.loader import resolve_model

    base = processor_source(run_dir, model)
    return processor_for(resolve_model(base), base)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def vision_parts(model: nn.Module) -> dict[Part, list[str]]:
    """{"tower": [module paths], "projector": [module paths]}: the roots of each part, module lists
    expanded to their members (so every root is a module that is called, as PEFT's modules_to_save needs)."""
    parts: dict[Part, list[str]] = {"tower": [], "projector": []}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in _TOWER_NAMES:
            parts["tower"].append(name)
        elif last in _PROJECTOR_NAMES:
            parts["projector"].append(name)
        elif last == "visual":
            for child, sub in module.named_children():
                if _has_parameters(sub):
                    parts["projector" if child == "merger" else "tower"].append(f"{name}.{child}")
    for part, roots in parts.items():
        expanded = []
        for root in roots:
            module = model.get_submodule(root)
            if isinstance(module, nn.ModuleList):
                expanded += [f"{root}.{index}" for index in range(len(module))]
            else:
                expanded.append(root)
        parts[part] = expanded
    return parts


def part_of(path: str, parts: dict[Part, list[str]]) -> Part | None:
    """Which vision part the module at `path` belongs to; None for the language model."""
    for part, roots in parts.items():
        if any(path == root or path.startswith(root + ".") for root in roots):
            return part
    return None


def is_vision_path(path: str) -> bool:
    """True for a module inside a vision tower or projector, by its path alone (before the model exists)."""
    return bool(set(path.split(".")) & {*_TOWER_NAMES, *_PROJECTOR_NAMES, "visual"})


def vision_training(settings: VisionSettings) -> dict[Part, Training]:
    return {"tower": settings.train_tower, "projector": settings.train_projector}


__all__ = ["VisionSettings", "auto_model_class", "is_vision_config", "is_vision_model", "is_vision_path", "load_processor", "run_processor",
           "part_of", "processor_for", "vision_parts", "vision_training"]
