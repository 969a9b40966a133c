"""Adapter routing: does `model: "auto"` pick the right adapter, and are routed replies as good as hand-picked ones?

Three tasks from the example generators (examples/make_extract_data.py, make_dates_data.py,
make_sort_data.py) each get a short LoRA run on the bundled model (`--steps` steps of batch 8; the
finish stage writes each run's routing signature from its training prompts). Then, on held-out prompts
(the first `--prompts` rows of each task's eval split, which the runs never saw) and on `GENERAL`
prompts of none of the tasks, `slimtune.routing.Router` picks an adapter or the base model for each:

- the confusion matrix (rows: the prompt's task, columns: the pick) and the share of right picks;
- exact match of the replies to each task's held-out prompts with the routed pick vs with the task's
  adapter chosen by hand (greedy, `--max-new-tokens`); routed replies come from whatever was picked.

    python bench/route_bench.py                    # trains three runs in a temporary directory
    python bench/route_bench.py --runs-dir runs/route          # keep (and reuse) the runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

TASKS = {"extract": "make_extract_data.py", "dates": "make_dates_data.py", "sort": "make_sort_data.py"}
MAX_NEW_TOKENS = {"extract": 40, "dates": 8, "sort": 24}
# Prompts of none of the tasks: general questions of the kinds a chat model gets, some near the tasks' topics
# (a person, a date, a list) so that "none" is not just "different words".
GENERAL = [
    "What is the capital of Australia?", "Write a haiku about autumn.", "How do I reverse a list in Python?",
    "Tell me a joke about cats.", "Explain photosynthesis simply.", "What are good exercises for back pain?",
    "Recommend a science fiction book.", "How many legs does a spider have?", "Translate 'thank you' into German.",
    "What is the difference between weather and climate?", "Give me tips for a job interview.", "Why do we dream?",
    "Summarize the French Revolution in two sentences.", "What's a healthy breakfast?", "How does a vaccine work?",
    "Write a limerick about a dog.", "Who painted the Mona Lisa?", "What year did World War II end?",
    "Plan a 3-day trip to Rome.", "Describe your favourite colour.", "Who was Marie Curie and what did she discover?",
    "How many days are there in a leap year?", "What fruits are high in vitamin C?",
    "Suggest a name for a bakery in Lisbon.", "What should a nurse study to become a midwife?",
    "Is it better to rent or buy a house?", "Explain what a JSON file is.", "Give me three ideas for a birthday party.",
    "How do I make a cup of green tea?", "What is the tallest mountain in Africa?",
]


def train_runs(runs_dir: Path, data_dir: Path, steps: int) -> dict[str, Path]:
    """One short LoRA run per task (reused when its weights exist)."""
    runs = {}
    for task in TASKS:
        out = runs_dir / task
        runs[task] = out
        if (out / "adapter_model.safetensors").is_file():
            print(f"reusing {out}", flush=True)
            continue
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "slimtune.cli", "train", str(ROOT / "examples" / "extract.yaml"),
                        f"output={out}", f"data.train={data_dir / f'{task}_train.jsonl'}", "data.eval=null",
                        f"train.max_steps={steps}", "train.log_every=5", "overwrite=true"],
                       check=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
        print(f"trained {task} in {time.perf_counter() - start:.0f} s", flush=True)
    return runs


def rows(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12,
                        help="training steps (batch 8) per run; 0: no runs, only signatures and the confusion matrix")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts per task")
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--threshold", type=float, help="override the signatures' thresholds")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    import torch

    from slimtune.data.formats import detect_format, to_messages
    from slimtune.data.reader import Row
    from slimtune.evaluate import exact_match, generate_replies
    from slimtune.methods.base import load_base
    from slimtune.methods.multi import AdapterSet
    from slimtune.routing import Router, Signature, build_signature

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="slimtune-route-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        for script in TASKS.values():
            subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out-dir", str(data_dir)], check=True,
                           stdout=subprocess.DEVNULL)
        trained = args.steps > 0
        runs = train_runs(args.runs_dir or Path(tmp) / "runs", data_dir, args.steps) if trained else {}
        model, tokenizer = load_base("smollm2-135m", False)
        model.eval()
        adapters = AdapterSet(model)
        for task, run in runs.items():
            adapters.load(run, task)

        def conversation(row: dict) -> list:
            return to_messages(Row(row, "bench"), detect_format(Row(row, "bench")))[:-1]

        if trained:  # the signatures the finish stage wrote
            signatures = {task: Signature.load(run) for task, run in runs.items()}
        else:  # signatures need no training: the same computation, on the training prompts directly
            signatures = {task: build_signature(model, tokenizer, [conversation(r) for r in rows(
                data_dir / f"{task}_train.jsonl", 10**9)], "smollm2-135m") for task in TASKS}
        router = Router(model, tokenizer, signatures, args.threshold)

        held_out = {task: rows(data_dir / f"{task}_eval.jsonl", args.prompts) for task in TASKS}
        prompts = {task: [conversation(r) for r in held] for task, held in held_out.items()}
        prompts["none"] = [[{"role": "user", "content": text}] for text in GENERAL]
        start = time.perf_counter()
        picks = {truth: [route.name or "base" for route in router.route_many(convs)] for truth, convs in prompts.items()}
        route_s = (time.perf_counter() - start) / sum(len(c) for c in prompts.values())

        replies: dict[tuple[str, str], list[str]] = {}  # (prompt set, adapter or 'base') -> replies to the whole set

        def replies_of(task: str, chosen: str) -> list[str]:
            if (task, chosen) not in replies:
                adapters.set_active(None if chosen == "base" else chosen)
                replies[task, chosen] = generate_replies(model, tokenizer, prompts[task], MAX_NEW_TOKENS[task], 16)
            return replies[task, chosen]

        quality = {}
        for task in TASKS if trained else ():
            references = [r["output"] for r in held_out[task]]
            hand = replies_of(task, task)
            routed = [replies_of(task, chosen)[i] for i, chosen in enumerate(picks[task])]
            base = replies_of(task, "base")
            quality[task] = {"base": exact_match(base, references), "hand": exact_match(hand, references),
                             "routed": exact_match(routed, references)}

    columns = [*TASKS, "base"]
    print(f"\nrouting on {args.prompts} held-out prompts per task + {len(GENERAL)} general prompts "
          f"({args.steps}-step runs; {route_s * 1000:.0f} ms per prompt to route)")
    print("| prompt of \\ routed to | " + " | ".join(columns) + " | right |")
    print("|---|" + "---:|" * (len(columns) + 1))
    right = total = 0
    for truth, chosen in picks.items():
        want = "base" if truth == "none" else truth
        counts = [chosen.count(c) for c in columns]
        right += chosen.count(want)
        total += len(chosen)
        print(f"| {truth} | " + " | ".join(map(str, counts)) + f" | {chosen.count(want) / len(chosen):.0%} |")
    print(f"\nright picks: {right}/{total} = {right / total:.1%} (goal >= 95%)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "picks": picks,
                                                   "quality": quality, "right": right, "total": total}, indent=2))

    if not quality:
        return
    print("\n| task | exact match, base | hand-picked adapter | routed | routed - hand (points) |")
    print("|---|---:|---:|---:|---:|")
    for task, q in quality.items():
        print(f"| {task} | {q['base']:.3f} | {q['hand']:.3f} | {q['routed']:.3f} | {100 * (q['routed'] - q['hand']):+.1f} |")


if __name__ == "__main__":
    main()
