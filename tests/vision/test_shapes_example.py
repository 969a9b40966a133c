"""The shapes example (examples/make_shapes_data.py, make_vl_model.py, shapes_vl.yaml): every answer is
what the picture shows, read back from the PNG pixels by a naive flood fill written here; the generator
is deterministic; the model builder writes a LLaVA directory whose language weights are the text model's
tensors unchanged, which slimtune trains with the example's own config (tiny text model here; the
integration test builds it on the bundled SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# The generator's palette, restated so a changed colour in the generator is caught.
PALETTE = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}


def example_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by breadth-first flood fill."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], queue, pixels = True, [start], []
        while queue:
            y, x = queue.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


def describe(path: Path) -> tuple[str, str, int]:
    """(colour, shape, count) of a picture: colour = the palette entry of the non-white pixels, shape =
    from the fill ratio of the bounding box (square 1, circle pi/4, triangle 1/2), count = components."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    mask = (pixels != 255).any(axis=2)
    colours = {tuple(p) for p in pixels[mask]}
    assert len(colours) == 1, f"{path.name}: the shapes must be drawn in one flat colour, got {len(colours)}"
    (rgb,) = colours
    colour = next(name for name, value in PALETTE.items() if value == rgb)
    parts = components(mask)
    ys, xs = zip(*parts[0])
    fill = len(parts[0]) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
    shape = "square" if fill > 0.95 else "circle" if 0.7 < fill < 0.85 else "triangle" if 0.4 < fill < 0.6 else "?"
    return colour, shape, len(parts)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_are_what_the_pictures_show(tmp_path: Path) -> None:
    example_module("make_shapes_data").write_dataset(tmp_path, train=40, eval_rows=12, seed=5)
    kinds = set()
    for split, rows in (("train", 40), ("eval", 12)):
        records = read_rows(tmp_path / f"{split}.jsonl")
        assert len(records) == rows
        for record in records:
            user, reply = record["messages"]
            image, question = user["content"]
            assert image["type"] == "image" and question["type"] == "text" and reply["role"] == "assistant"
            colour, shape, count = describe(tmp_path / image["image"])
            if question["text"].startswith("What shape"):
                assert count == 1 and reply["content"] == f"a {colour} {shape}", (image["image"], reply)
            else:
                assert reply["content"] == str(count) and 1 <= count <= 4, (image["image"], reply)
            kinds.add(question["text"][:8])
    assert kinds == {"What sha", "How many"}


def test_generator_is_deterministic(tmp_path: Path) -> None:
    generator = example_module("make_shapes_data")
    generator.write_dataset(tmp_path / "a", train=10, eval_rows=4, seed=3)
    generator.write_dataset(tmp_path / "b", train=10, eval_rows=4, seed=3)
    generator.write_dataset(tmp_path / "c", train=10, eval_rows=4, seed=4)
    assert (tmp_path / "a/train.jsonl").read_bytes() == (tmp_path / "b/train.jsonl").read_bytes()
    pictures = sorted(p.name for p in (tmp_path / "a/images").iterdir())
    assert len(pictures) == 14
    for name in pictures:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a/images" / name)),
                              np.asarray(Image.open(tmp_path / "b/images" / name))), name
    assert any(not np.array_equal(np.asarray(Image.open(tmp_path / "a/images" / name)),
                                  np.asarray(Image.open(tmp_path / "c/images" / name))) for name in pictures)


def check_language_weights(vl_dir: Path, text_dir: Path) -> None:
    """Every tensor of the text model appears unchanged in the VL model (the embedding rows up to the
    text vocabulary; one more row is the image token's)."""
    text, vl = load_file(text_dir / "model.safetensors"), load_file(vl_dir / "model.safetensors")
    for key, tensor in text.items():
        # transformers writes LLaVA files in the original layout (language_model.model.layers...); accept
        # its in-memory layout (model.language_model.layers...) too.
        candidates = ["language_model." + key, key.replace("model.", "model.language_model.", 1)]
        moved = next((name for name in candidates if name in vl), None)
        assert moved, f"{key} is missing from the VL model (looked for {candidates})"
        got = vl[moved][: tensor.shape[0]] if "embed_tokens" in key or "lm_head" in key else vl[moved]
        assert torch.equal(got.to(tensor.dtype), tensor), f"{moved} differs from the text model's {key}"
    assert any("vision_tower." in key for key in vl) and any("multi_modal_projector." in key for key in vl)


def test_built_model_trains_with_the_example_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    import slimtune

    data = tmp_path / "data"
    example_module("make_shapes_data").write_dataset(data, train=8, eval_rows=4, seed=0)
    vl_dir = example_module("make_vl_model").build_vl_model(tmp_path / "vl", text_model=str(tiny_model_dir),
                                                            vision_hidden=32)
    config = json.loads((vl_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["image_size"] == 64
    check_language_weights(vl_dir, tiny_model_dir)

    cfg = slimtune.load_config(EXAMPLES / "shapes_vl.yaml", overrides=[
        f"model={vl_dir}", f"output={tmp_path / 'run'}", f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'eval.jsonl'}", "data.max_length=256",  # the test tokenizer: a token per byte
        "train.max_steps=2", "train.batch_size=4", "train.precision=fp32",
        "eval.generations=2", "eval.max_new_tokens=3", "eval.batch_size=4"])
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32).state_dict()
    result = slimtune.finetune(cfg)
    run = Path(result.output)
    adapter = json.loads((run / "adapter_config.json").read_text())
    # The example's recipe: LoRA on the language model, tower and projector trained whole.
    assert sorted(adapter["modules_to_save"])[0].startswith("model.multi_modal_projector")
    assert any(m.startswith("model.vision_tower") for m in adapter["modules_to_save"])
    saved = load_file(run / "adapter_model.safetensors")
    assert all("vision_tower" not in k and "multi_modal_projector" not in k for k in saved if "lora_" in k)
    tower = {k: v for k, v in saved.items() if ".vision_tower." in k}
    assert tower, "the trained tower weights are not in the adapter file"
    changed = [k for k, v in tower.items()
               if not torch.equal(v, before[k.replace("base_model.model.", "", 1)].to(v.dtype))]
    assert changed, "the vision tower did not train"
    metrics = json.loads((run / "eval.json").read_text())
    assert {"base", "tuned"} <= set(metrics) and "exact_match" in metrics["tuned"], metrics


@pytest.mark.integration
def test_language_side_is_the_bundled_model(tmp_path: Path, bundled_model_dir: Path) -> None:
    """On real weights: the built model's language weights are SmolLM2-135M-Instruct's, and a text-only
    prompt gives the bundled model's logits."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    vl_dir = example_module("make_vl_model").build_vl_model(tmp_path / "vl")
    check_language_weights(vl_dir, bundled_model_dir)
    ids = AutoTokenizer.from_pretrained(bundled_model_dir)("The capital of France is", return_tensors="pt").input_ids
    text = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    vl = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32)
    with torch.no_grad():
        expected, got = text(ids).logits, vl(input_ids=ids).logits[..., : text.config.vocab_size]
    # fp32 rounding only (the head's matmul has one more column, so it is blocked differently): logits
    # are ~10 in size, a changed weight moves them by far more than 1e-4.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
