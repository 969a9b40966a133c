"""Generate a small image-text dataset: pictures of shapes, questions about colour, shape and count.

Two kinds of question, each answered by a short phrase, so exact match checks the reply:

    "What shape and colour is this?"   (one shape)             -> "a red circle"
    "How many shapes?"                 (1-4 shapes, one kind)  -> "3"

Pictures are 64x64 PNG files on a white background: one of 4 colours x 3 shapes (circle, square,
triangle) at a random size and position; in the counting pictures the shapes share a colour and a kind
and do not overlap. The answer is a function of the picture alone, which the tests check by reading
the pixels back.

Rows are in the OpenAI/transformers content-part form, image paths relative to the data file:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/train-0000.png"},
                                               {"type": "text", "text": "What shape and colour is this?"}]},
                  {"role": "assistant", "content": "a red circle"}]}

Everything is drawn from one seeded `random.Random`, so running the script twice with the same
arguments writes the same pixels and the same JSONL.

Usage:
    python examples/make_shapes_data.py [--out-dir examples/data/shapes] [--train 640] [--eval 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 4
ASK_SHAPE = "What shape and colour is this?"
ASK_COUNT = "How many shapes?"


def draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    """One filled shape inside the square `box` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # an upward triangle filling the box's width
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)


def place_boxes(rng: random.Random, count: int, side: int) -> list[tuple[int, int, int, int]]:
    """`count` square boxes of `side` pixels inside the picture, at least 3 pixels apart."""
    while True:  # rejection sampling; with side <= 16 and count <= 4 a layout is found in a few tries
        boxes = []
        for _ in range(200):
            x, y = rng.randint(1, SIZE - side - 2), rng.randint(1, SIZE - side - 2)
            box = (x, y, x + side, y + side)
            if all(x >= b[2] + 3 or b[0] >= x + side + 3 or y >= b[3] + 3 or b[1] >= y + side + 3 for b in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes


def make_example(rng: random.Random, kind: str):
    """(PIL image, question, answer) for one row of `kind` 'shape' or 'count'."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    if kind == "shape":
        side = rng.randint(22, 40)
        boxes = place_boxes(rng, 1, side)
        question, answer = ASK_SHAPE, f"a {colour} {shape}"
    else:
        count = rng.randint(1, MAX_COUNT)
        boxes = place_boxes(rng, count, rng.randint(11, 15))
        question, answer = ASK_COUNT, str(count)
    for box in boxes:
        draw_shape(draw, shape, box, COLOURS[colour])
    return image, question, answer


def make_split(rng: random.Random, name: str, rows: int, out_dir: Path) -> list[dict]:
    """`rows` examples, alternating the two kinds; images saved as `images/<name>-NNNN.png`."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(rows):
        image, question, answer = make_example(rng, "shape" if index % 2 == 0 else "count")
        relative = f"images/{name}-{index:04d}.png"
        image.save(out_dir / relative)
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": relative}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]})
    return records


def write_dataset(out_dir: Path, train: int, eval_rows: int, seed: int) -> None:
    rng = random.Random(seed)
    for name, rows in (("train", train), ("eval", eval_rows)):
        records = make_split(rng, name, rows, out_dir)
        text = "".join(json.dumps(record) + "\n" for record in records)
        (out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "data" / "shapes")
    parser.add_argument("--train", type=int, default=640)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.out_dir, args.train, args.eval, args.seed)
    print(f"wrote {args.train} train and {args.eval} eval rows with their images to {args.out_dir}")


if __name__ == "__main__":
    main()
