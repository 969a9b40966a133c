"""LoRA on tiny random vision-language models (Qwen2.5-VL, LLaVA) through the normal four stages: PEFT
loads the adapter with the same logits, merged == unmerged, the vision tower is bit-equal when frozen
and trained when asked, QLoRA keeps the vision side 16-bit, `slimtune generate --image`."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from rich.console import Console

from slimtune.config import build_config
from slimtune.data.images import load_image
from slimtune.models.vision import load_processor, vision_parts
from tiny_vl import make_llava_dir, make_qwen_vl_dir, write_image

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
QUIET = Console(quiet=True)


def write_colour_data(root: Path) -> Path:
    rows = []
    for name, colour in COLOURS.items():
        write_image(root / "img" / f"{name}.png", colour)
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{name}.png"},
                                                               {"type": "text", "text": "colour?"}]},
                                  {"role": "assistant", "content": name}]})
        rows.append({"messages": [{"role": "user", "content": "<image>which colour?"},
                                  {"role": "assistant", "content": name}], "images": [f"img/{name}.png"]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_config(model_dir: Path, data: Path, out: Path, **extra) -> object:
    tree = {"model": str(model_dir), "output": str(out), "data": {"train": str(data), "max_length": 256},
            "train": {"max_steps": 3, "batch_size": 3, "lr": 2e-2, "save_every": None, "precision": "fp32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    for key, value in extra.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})
        if name:
            tree[section][name] = value
        else:
            tree[section] = value
    return build_config(tree)


def train(cfg):
    """The four stages, keeping the trained model in memory for the checks."""
    from slimtune.stages import build_run, check_run, finish_run
    from slimtune.train.loop import run_training

    checked = check_run(cfg, QUIET)
    with ExitStack() as stack:
        built = build_run(checked, QUIET, stack)
        before = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
        summary = run_training(built.model, built.attached, checked.train_set, cfg.train,
                               checked.tokenizer.pad_token_id, cfg.output / "metrics.jsonl", QUIET,
                               device=checked.device, precision=built.precision, packing=False)
        finish_run(built, summary, QUIET)
        return built.model, before


def image_inputs(model_dir: Path, image: Path) -> dict:
    processor = load_processor(str(model_dir))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
        tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[load_image(str(image), "test")], return_tensors="pt"))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = (make_qwen_vl_dir if request.param == "qwen2_5_vl" else make_llava_dir)(root / "model")
    data = write_colour_data(root / "data")
    cfg = run_config(model_dir, data, root / "run")
    model, before = train(cfg)
    return model_dir, root, model, before


def test_frozen_vision_parts_are_bit_equal_and_only_the_language_model_adapts(trained):
    model_dir, root, model, before = trained
    parts = vision_parts(model)
    assert parts["tower"] and parts["projector"]
    after = model.state_dict()
    vision_keys = [k for k in before if any(k.startswith(root_ + ".") for roots in parts.values() for root_ in roots)]
    assert vision_keys and all(torch.equal(before[k], after[k]) for k in vision_keys)
    adapter = json.loads((root / "run" / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert all("language_model" in t for t in targets) and len(targets) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    trained_b = [k for k, v in after.items() if k.endswith("lora_B.weight") and v.abs().sum() > 0]
    assert trained_b, "the adapters did not train"
    # The finish stage routes on the language model's layers and the prompts' text parts.
    assert (root / "run" / "routing_signature.safetensors").is_file(), "a VL run writes its routing signature"


def test_peft_loads_the_adapter_with_the_same_logits_and_merge_matches(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from slimtune.merge import merge_run
    from slimtune.runs import load_run

    model_dir, root, _, _ = trained
    inputs = image_inputs(model_dir, root / "data" / "img" / "blue.png")
    ours, _ = load_run(root / "run")
    expected = logits(ours, inputs)
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), root / "run").eval()
    assert torch.allclose(logits(peft, inputs), expected, atol=1e-5, rtol=0)
    base = logits(AutoModelForImageTextToText.from_pretrained(model_dir).eval(), inputs)
    assert (base - expected).abs().max() > 1e-4  # the adapter changes the output
    merged_dir = merge_run(root / "run", root / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5, rtol=0)
    assert load_processor(str(merged_dir)).chat_template  # the merged directory carries the processor files


def test_projector_trained_fully_and_tower_by_lora_round_trip_through_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from slimtune.runs import load_run

    model_dir = make_qwen_vl_dir(tmp_path / "model")
    cfg = run_config(model_dir, write_colour_data(tmp_path / "data"), tmp_path / "run",
                     vision={"train_projector": "full", "train_tower": "lora"})
    model, before = train(cfg)
    after = model.state_dict()
    projector = [k for k in before if k.startswith("model.visual.merger.")]
    assert projector and all(not torch.equal(before[k], after[k]) for k in projector if k.endswith("weight"))
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["model.visual.merger"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any(".visual.blocks." in key and "lora_A" in key for key in saved)
    assert "base_model.model.model.visual.merger.mlp.0.weight" in saved
    inputs = image_inputs(model_dir, tmp_path / "data" / "img" / "red.png")
    ours, _ = load_run(tmp_path / "run")
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), tmp_path / "run").eval()
    assert torch.allclose(logits(peft, inputs), logits(ours, inputs), atol=1e-5, rtol=0)


def test_qlora_quantizes_the_language_model_only(tmp_path):
    from torch import nn

    from slimtune.quant import Linear4bit

    model_dir = make_qwen_vl_dir(tmp_path / "model")
    cfg = run_config(model_dir, write_colour_data(tmp_path / "data"), tmp_path / "run", method="qlora")
    model, _ = train(cfg)
    kinds = {name: type(m.base_layer if hasattr(m, "base_layer") else m) for name, m in model.named_modules()
             if isinstance(getattr(m, "base_layer", m), (nn.Linear, Linear4bit)) and "lora_" not in name}
    assert all(kind is nn.Linear for name, kind in kinds.items() if ".visual." in name)
    assert all(kind is Linear4bit for name, kind in kinds.items() if ".language_model." in name)


def test_generate_and_eval_with_images_on_the_command_line(trained, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from test_cli import run_cli

    model_dir, root, _, _ = trained
    image = root / "data" / "img" / "green.png"
    args = ["generate", root / "run", "colour?", "--max-new-tokens", "3", "--image"]
    code, out, err = run_cli(monkeypatch, capsys, *args, image)
    assert code == 0, err
    # Reference: the greedy reply of transformers' generate on the PEFT-loaded model.
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), root / "run").eval()
    inputs = image_inputs(model_dir, image)
    tokenizer = load_processor(str(model_dir)).tokenizer
    reply = peft.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    assert out.strip() == tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    code, out, err = run_cli(monkeypatch, capsys, *args, tmp_path / "nope.png")
    assert code == 2 and "nope.png' does not exist" in err and "Traceback" not in err
    code, out, err = run_cli(monkeypatch, capsys, "eval", root / "run", "--data", root / "data" / "train.jsonl",
                             "--generations", "2", "--max-new-tokens", "2")
    assert code == 0, err
    metrics = json.loads((root / "run" / "eval_metrics.json").read_text())
    assert metrics["examples"] == 6 and metrics["base"]["tokens"] == metrics["tuned"]["tokens"] > 0
    assert "[image: " in (root / "run" / "eval_report.md").read_text()
