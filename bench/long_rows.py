"""Long training rows from the demo data, for measuring steps at ~1,000 tokens per example.

Each row joins 8-24 random sentences of the first `--examples` rows of `extract_train.jsonl` into one
input and their JSON records into one list as the output (~860 tokens per row on average with the
bundled model's chat template), so a batch of 4 is ~3,500 tokens with little padding between rows.

    python bench/long_rows.py --out bench/results/long_rows.jsonl
    python bench/slimtune_runner.py --model-dir DIR --train bench/results/long_rows.jsonl --max-length 2048
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = ("Extract each person's name, age, city and job from the sentences as a JSON list of objects with "
               "keys name, age, city, job.")


def long_rows(source: Path, examples: int, rows: int, seed: int) -> list[dict]:
    pool = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:examples]]
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        picks = rng.sample(pool, rng.randint(8, 24))
        out.append({"instruction": INSTRUCTION, "input": " ".join(p["input"] for p in picks),
                    "output": "[" + ", ".join(p["output"] for p in picks) + "]"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT / "examples" / "data" / "extract_train.jsonl")
    parser.add_argument("--examples", type=int, default=96, help="rows of the source to draw sentences from")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = long_rows(args.source, args.examples, args.rows, args.seed)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
