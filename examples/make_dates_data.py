"""Generate a date-normalisation fine-tuning dataset (Alpaca format): a date written in words -> ISO 8601.

    input:  "We met on the 5th of March, 2021, at the station."
    output: "2021-03-05"

A second small task beside the extraction demo (examples/make_extract_data.py), used by the adapter
routing bench (bench/route_bench.py). The answer is checkable by exact match. Train and eval draw
from disjoint sets of (year, month, day) dates; one seeded `random.Random` makes the files
byte-identical across runs.

Usage:
    python examples/make_dates_data.py [--out-dir examples/data] [--train 400] [--eval 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Rewrite the date mentioned in the sentence in ISO 8601 format (YYYY-MM-DD)."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
TEMPLATES = [
    "We met on {long}, at the station.",
    "The contract was signed {short}.",
    "Her flight leaves on {us}.",
    "On {long} the museum reopened after repairs.",
    "Please submit the report by {us}.",
    "The concert took place {short} in the old town.",
    "{Us} is the day the shop first opened.",
    "Payment is due no later than {long}.",
]


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def make_row(rng: random.Random, date: tuple[int, int, int]) -> dict[str, str]:
    year, month, day = date
    forms = {"long": f"the {ordinal(day)} of {MONTHS[month - 1]}, {year}",
             "short": f"on {day} {MONTHS[month - 1][:3]} {year}",
             "us": f"{MONTHS[month - 1]} {day}, {year}"}
    forms["Us"] = forms["us"]
    sentence = rng.choice(TEMPLATES).format(**forms)
    return {"instruction": INSTRUCTION, "input": sentence, "output": f"{year:04d}-{month:02d}-{day:02d}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    dates = [(y, m, d) for y in range(1950, 2031) for m in range(1, 13) for d in range(1, DAYS_IN[m - 1] + 1)]
    picked = rng.sample(dates, args.train + args.eval)
    splits = {"train": picked[:args.train], "eval": picked[args.train:]}  # disjoint dates
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, chosen in splits.items():
        path = args.out_dir / f"dates_{split}.jsonl"
        path.write_text("".join(json.dumps(make_row(rng, d)) + "\n" for d in chosen), encoding="utf-8")
        print(f"wrote {len(chosen)} rows to {path}")


if __name__ == "__main__":
    main()
