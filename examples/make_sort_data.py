"""Generate a word-sorting fine-tuning dataset (Alpaca format): a list of words -> the same words sorted.

    input:  "plum, cherry, fig, apple"
    output: "apple, cherry, fig, plum"

A third small task beside the extraction demo (examples/make_extract_data.py), used by the adapter
routing bench (bench/route_bench.py). The answer is checkable by exact match. Train and eval lists
never share their set of words; one seeded `random.Random` makes the files byte-identical across runs.

Usage:
    python examples/make_sort_data.py [--out-dir examples/data] [--train 400] [--eval 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Sort these words alphabetically and list them separated by commas."
WORDS = ["apple", "banana", "cherry", "date", "fig", "grape", "kiwi", "lemon", "mango", "melon", "olive", "orange",
         "peach", "pear", "plum", "quince", "cedar", "birch", "maple", "willow", "oak", "pine", "river", "stone",
         "cloud", "ember", "frost", "harbor", "island", "meadow", "canyon", "desert", "forest", "glacier", "valley",
         "violet", "amber", "coral", "ivory", "scarlet"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set[frozenset[str]] = set()
    rows = []
    while len(rows) < args.train + args.eval:
        words = rng.sample(WORDS, rng.randint(3, 6))
        if frozenset(words) in seen:
            continue
        seen.add(frozenset(words))
        rows.append({"instruction": INSTRUCTION, "input": ", ".join(words), "output": ", ".join(sorted(words))})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, chosen in (("train", rows[:args.train]), ("eval", rows[args.train:])):
        path = args.out_dir / f"sort_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in chosen), encoding="utf-8")
        print(f"wrote {len(chosen)} rows to {path}")


if __name__ == "__main__":
    main()
