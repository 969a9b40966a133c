"""Mixture serving throughput: requests for weighted mixtures of adapters vs requests for one adapter.

One `slimtune serve` process holds `--adapters` random LoRA adapters (as in bench/serve_load.py). The
same prompts go to it twice per round from `--clients` concurrent streaming clients, greedy and
`ignore_eos` (every reply exactly `--max-tokens` tokens): once all for `adapter0` ("single"), once each
for a random mixture of two or three adapters with random weights, such as `adapter1:0.62+adapter3:0.38`
("mixture"). The two loads alternate (single first in odd rounds), and the ratio of the pooled output
tokens/s mixture / single is the figure (goal >= 0.8).

    python bench/serve_mix.py --clients 32 --requests 64 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from serve_load import PROMPTS, Server, make_adapters, run_load  # noqa: E402


def random_mixture(rng: random.Random, names: list[str]) -> str:
    parts = rng.sample(names, rng.choice([2, 3]))
    weights = [rng.random() + 0.1 for _ in parts]
    return "+".join(f"{name}:{w / sum(weights):.2f}" for name, w in zip(parts, weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    from slimtune.models import resolve_model

    model_dir = resolve_model(args.model)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="slimtune-mix-bench-") as tmp:
        root = Path(tmp)
        print(f"making {args.adapters} random rank-{args.rank} adapters on {args.model} ...", flush=True)
        names = make_adapters(model_dir, root, args.adapters, args.rank)
        prompts = [rng.choice(PROMPTS) for _ in range(args.requests)]
        loads = {"single": [(names[0], p) for p in prompts],
                 "mixture": [(random_mixture(rng, names), p) for p in prompts]}
        server = Server(["--model", model_dir, "--adapter-root", str(root), *(f"--adapter={n}={n}" for n in names)],
                        root, root / "server.log", args.threads)
        rounds = []
        try:
            for index in range(args.rounds):
                for mode in ("single", "mixture") if index % 2 == 0 else ("mixture", "single"):
                    print(f"round {index + 1}, {mode}: {args.clients} clients ...", flush=True)
                    result = asyncio.run(run_load(server.url, loads[mode], args.clients, args.max_tokens, None))
                    rounds.append({"round": index + 1, "mode": mode, **result})
        finally:
            server.stop()

    print(f"\n{args.clients} concurrent clients, {args.requests} requests of {args.max_tokens} output tokens, "
          f"{args.adapters} rank-{args.rank} adapters on {args.model}, {os.cpu_count()} CPU cores")
    print("| requests for | round | requests | failures | latency p50 / p95 s | output tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rounds:
        print(f"| {r['mode']} | {r['round']} | {r['requests']} | {r['failures']} | "
              f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} | {r['output_tokens_per_s']:.1f} |")
        for error in r["errors"]:
            print(f"  failure: {error}")
    pooled = {mode: sum(r["output_tokens"] for r in rounds if r["mode"] == mode) /
              sum(r["wall_s"] for r in rounds if r["mode"] == mode) for mode in loads}
    ratio = pooled["mixture"] / pooled["single"]
    print(f"\npooled output tokens/s: mixture {pooled['mixture']:.1f}, single adapter {pooled['single']:.1f}; "
          f"mixture / single = {ratio:.2f} (goal >= 0.8)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "pooled": pooled,
                                                   "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
