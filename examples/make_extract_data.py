"""Generate a small structured-extraction fine-tuning dataset (Alpaca format).

The task: given one short English sentence describing a person, produce a
compact JSON record with the person's name, age, city and job, e.g.

    input:  "In Lisbon lives a 34-year-old nurse named Maria Lopez."
    output: {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}

Why this task: it is small enough to fine-tune in minutes, yet the answer is
checkable by exact match, so a before/after comparison of a fine-tuned model
is unambiguous. To make the model actually extract (rather than copy a fixed
pattern) the sentences come from many templates with the fields in different
orders, and some templates add a distracting number or detail ("since 2015",
"with 2 kids") that must not leak into the record.

Splits: both splits use the same templates, but the set of full names is
partitioned, so every eval row describes a person (and hence a name/city/job
combination) never seen in training, and no eval sentence occurs in train.

Everything is driven by one seeded ``random.Random``, so running the script
twice with the same arguments writes byte-identical files.

Usage:
    python examples/make_extract_data.py [--out-dir examples/data]
        [--train 600] [--eval 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

INSTRUCTION = (
    "Extract the person's name, age, city and job from the sentence as JSON "
    "with keys name, age, city, job."
)

# ASCII-only names on purpose: json.dumps escapes non-ASCII by default, and we
# do not want the model to have to learn \uXXXX escapes for this toy task.
FIRST_NAMES: list[str] = [
    "Maria", "James", "Aisha", "Kenji", "Olga", "Mateo", "Priya", "Lars",
    "Fatima", "Chen", "Sofia", "Tomasz", "Amara", "Diego", "Ingrid", "Ravi",
    "Yuki", "Omar", "Elena", "Kwame", "Hana", "Lucas", "Zainab", "Pablo",
    "Freya", "Arjun", "Leila", "Sven", "Mei", "Tariq", "Chloe", "Nikolai",
    "Ayesha", "Hugo", "Nadia", "Emeka", "Rosa", "Dmitri", "Sakura", "Bruno",
    "Grace", "Mohammed", "Lina", "Anders", "Carmen", "Jamal", "Isla", "Kofi",
    "Noor", "Felix", "Valentina", "Hiroshi", "Zoe", "Rafael", "Astrid",
    "Samuel", "Mariam", "Jonas", "Luisa", "Tenzin",
]

LAST_NAMES: list[str] = [
    "Lopez", "Smith", "Okafor", "Tanaka", "Ivanova", "Garcia", "Sharma",
    "Nilsson", "Haddad", "Wang", "Rossi", "Kowalski", "Mensah", "Fernandez",
    "Johansson", "Patel", "Sato", "Khan", "Petrova", "Asante", "Kim", "Silva",
    "Bello", "Moreno", "Larsen", "Gupta", "Rahimi", "Berg", "Liu", "Aziz",
    "Dubois", "Volkov", "Siddiqui", "Martin", "Benali", "Nwosu", "Romero",
    "Popescu", "Nakamura", "Costa", "Murphy", "Hassan", "Novak", "Lindqvist",
    "Herrera", "Diallo", "Walsh", "Yamamoto", "Schmidt", "Fischer", "Adeyemi",
    "Papadopoulos", "Nguyen", "Oliveira", "Horvat", "Kaya", "Mwangi",
    "Brennan", "Jensen", "Dorji",
]

CITIES: list[str] = [
    "Lisbon", "Tokyo", "Nairobi", "Toronto", "Oslo", "Lima", "Mumbai",
    "Berlin", "Cairo", "Seoul", "Madrid", "Krakow", "Accra", "Sydney",
    "Vienna", "Istanbul", "Buenos Aires", "Dublin", "Hanoi", "Chicago",
    "Lagos", "Prague", "Osaka", "Marseille", "Bogota", "Helsinki", "Manila",
    "Casablanca", "Athens", "Montreal", "Cape Town", "Edinburgh", "Jakarta",
    "Porto", "Santiago", "Warsaw", "Kyoto", "Denver", "Tunis", "Auckland",
    "Bangalore", "Zurich", "Valencia", "Kampala", "Reykjavik", "Seattle",
    "Copenhagen", "Quito", "Budapest", "Melbourne",
]

# Jobs are lowercase and must never start a sentence: the test checks that the
# exact job string occurs in the sentence, so it must not be capitalized.
JOBS: list[str] = [
    "nurse", "teacher", "engineer", "architect", "baker", "pilot",
    "accountant", "electrician", "plumber", "journalist", "pharmacist",
    "software developer", "chef", "dentist", "librarian", "photographer",
    "lawyer", "carpenter", "translator", "veterinarian", "firefighter",
    "graphic designer", "economist", "mechanic", "florist", "biologist",
    "editor", "tailor", "physiotherapist", "bus driver", "barista",
    "data analyst", "illustrator", "surgeon", "gardener", "optician",
    "police officer", "musician", "social worker", "civil engineer",
]

MIN_AGE, MAX_AGE = 19, 78
MAX_WORDS = 25

Fields = dict[str, object]
Template = Callable[[Fields, random.Random], str]


def article(word: str) -> str:
    """Return 'a word' or 'an word'; all our jobs start with a plain vowel/consonant sound."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def other_city(rng: random.Random, city: str) -> str:
    """Draw a distractor city different from the real one, so the label stays unambiguous."""
    while True:
        other = rng.choice(CITIES)
        if other != city:
            return other


def distractor_number(rng: random.Random, lo: int, hi: int, age: int) -> int:
    """Draw a distractor number that differs from the age and does not contain it.

    Keeping str(age) out of the distractor means the age is the only place in
    the sentence where those digits appear, so the label is unambiguous.
    """
    while True:
        n = rng.randint(lo, hi)
        if n != age and str(age) not in str(n):
            return n


# Each template gets the fields plus the rng (for distractors). Ages follow the
# pattern "a N-year-old": ages 19-78 never need "an" (no 8, 11, 18, 80-89).
TEMPLATES: list[Template] = [
    lambda f, r: f"{f['name']}, {f['age']}, works as {article(f['job'])} in {f['city']}.",
    lambda f, r: f"In {f['city']} lives a {f['age']}-year-old {f['job']} named {f['name']}.",
    lambda f, r: f"{f['name']} (age {f['age']}) is {article(f['job'])} based in {f['city']}.",
    lambda f, r: f"At {f['age']}, {f['name']} moved to {f['city']} to become {article(f['job'])}.",
    lambda f, r: f"{f['name']} is a {f['age']}-year-old {f['job']} from {f['city']}.",
    lambda f, r: f"Meet {f['name']}: {f['age']} years old, {f['job']}, living in {f['city']}.",
    lambda f, r: f"{f['city']} is home to {f['name']}, {article(f['job'])} aged {f['age']}.",
    lambda f, r: (
        f"Working as {article(f['job'])} in {f['city']}, {f['name']} just turned {f['age']}."
    ),
    lambda f, r: f"Our new {f['job']} in {f['city']} is {f['name']}, age {f['age']}.",
    lambda f, r: f"{f['age']}-year-old {f['name']} works as {article(f['job'])} in {f['city']}.",
    lambda f, r: f"Name: {f['name']}; city: {f['city']}; job: {f['job']}; age: {f['age']}.",
    lambda f, r: (
        f"Last year {f['name']} became {article(f['job'])}; "
        f"now {f['age']}, they live in {f['city']}."
    ),
    lambda f, r: f"The {f['job']} everyone in {f['city']} knows is {f['name']}, who is {f['age']}.",
    # Templates with a distractor number or detail that must not be extracted.
    lambda f, r: (
        f"The {f['job']} {f['name']}, {f['age']}, has lived in {f['city']} "
        f"since {distractor_number(r, 1995, 2023, int(f['age']))}."
    ),
    lambda f, r: (
        f"{f['name']}, who is {f['age']}, has been {article(f['job'])} in {f['city']} "
        # Cap the tenure so nobody has worked since childhood.
        f"for {distractor_number(r, 2, min(30, int(f['age']) - 16), int(f['age']))} years."
    ),
    lambda f, r: (
        f"{f['name']} ({f['age']}) lives in {f['city']} with "
        f"{distractor_number(r, 2, 4, int(f['age']))} kids and works as {article(f['job'])}."
    ),
    lambda f, r: (
        f"After {distractor_number(r, 3, 15, int(f['age']))} years in {f['city']}, "
        f"{f['name']}, {f['age']}, still works as {article(f['job'])}."
    ),
    lambda f, r: (
        f"{f['name']}, {article(f['job'])} from {f['city']}, celebrated turning "
        f"{f['age']} with {distractor_number(r, 5, 40, int(f['age']))} friends."
    ),
    lambda f, r: (
        f"Originally from {other_city(r, str(f['city']))}, "
        f"{f['name']} now works as {article(f['job'])} "
        f"in {f['city']} at age {f['age']}."
    ),
]


def split_full_names(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Partition all first x last name pairs into disjoint train/eval pools.

    Holding out whole people (not templates) keeps the surface forms identical
    across splits while guaranteeing eval records are unseen combinations.
    """
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    # Eval pool size is proportional to the requested split, with a floor so
    # small eval sets still get a varied pool.
    n_eval_names = max(50, round(len(names) * n_eval / max(1, n_train + n_eval)))
    return names[n_eval_names:], names[:n_eval_names]


def make_row(rng: random.Random, name: str, template: Template) -> dict[str, str]:
    """Build one Alpaca-format row for a given person name and template."""
    city = rng.choice(CITIES)
    job = rng.choice(JOBS)
    age = rng.randint(MIN_AGE, MAX_AGE)
    fields: Fields = {"name": name, "age": age, "city": city, "job": job}
    sentence = template(fields, rng)
    assert len(sentence.split()) < MAX_WORDS, sentence
    # Key order name, age, city, job and default separators are part of the spec.
    output = json.dumps({"name": name, "age": age, "city": city, "job": job})
    return {"instruction": INSTRUCTION, "input": sentence, "output": output}


def make_split(rng: random.Random, names: list[str], n_rows: int) -> list[dict[str, str]]:
    """Generate n_rows rows with unique input sentences from a name pool."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    # Cycle through the templates in shuffled blocks so every template is
    # represented roughly equally, even in the small eval split.
    order: list[Template] = []
    attempts = 0
    while len(rows) < n_rows:
        attempts += 1
        if attempts > 100 * n_rows + 1000:
            raise RuntimeError(f"could not generate {n_rows} unique rows")
        if not order:
            order = list(TEMPLATES)
            rng.shuffle(order)
        template = order.pop()
        row = make_row(rng, rng.choice(names), template)
        if row["input"] in seen:
            continue
        seen.add(row["input"])
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as JSON lines with fixed encoding/newlines for byte-identical output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Default next to this script, so the committed data lands in examples/data
    # regardless of the current working directory.
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--train", type=int, default=600, help="number of train rows")
    parser.add_argument("--eval", type=int, default=60, help="number of eval rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    train_names, eval_names = split_full_names(rng, args.train, args.eval)
    train_rows = make_split(rng, train_names, args.train)
    eval_rows = make_split(rng, eval_names, args.eval)
    # Disjoint name pools already imply disjoint sentences; check anyway.
    assert not {r["input"] for r in train_rows} & {r["input"] for r in eval_rows}

    train_path = args.out_dir / "extract_train.jsonl"
    eval_path = args.out_dir / "extract_eval.jsonl"
    write_jsonl(train_path, train_rows)
    write_jsonl(eval_path, eval_rows)
    print(f"wrote {len(train_rows)} rows to {train_path}")
    print(f"wrote {len(eval_rows)} rows to {eval_path}")


if __name__ == "__main__":
    main()
