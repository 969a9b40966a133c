"""Serving load: many concurrent clients against `slimtune serve`: mixed adapters vs one merged model, or
vs the peer `transformers serve --continuous-batching`.

The same requests (chat prompts, each for a randomly chosen adapter, greedy, `ignore_eos` so every
reply is exactly `--max-tokens` tokens long) are sent by `--clients` concurrent streaming clients (the
official `openai` client), first to a server holding `--adapters` LoRA adapters on the base model
(rows of different adapters share every decode step), then to a server holding one model with the
first adapter merged into its weights (`slimtune.api.merge_run`), which is the cost floor of serving
a single fine-tuned model. Each server runs in its own process, started the way a user starts it.

Reported per configuration and round: requests, failures, latency p50 / p95 (request sent -> last
token), time to first token p50 / p95, and output tokens/s (all output tokens / wall time of the load);
then the ratio mixed / merged of the pooled tokens/s (all rounds' tokens / all rounds' wall time).
With `--rounds N` the two servers alternate (mixed first in odd rounds, merged first in even ones), so
slow drifts of a shared machine hit both alike; `--threads` sets the servers' OMP_NUM_THREADS.

The adapters are random (rank `--rank` on q/k/v/o, B ~ N(0, 0.02^2)), not trained: a reply's cost
does not depend on what the weights say, and random weights keep the bench self-contained.

    python bench/serve_load.py                                  # 64 clients x 2 requests, 64 tokens each
    python bench/serve_load.py --mode mixed --duration 60       # only the mixed-adapter server, for 60 s
    python bench/serve_load.py --rounds 2 --threads 1 --json-out bench/results/serve_load.json

`--mode peer` compares against `transformers serve --continuous-batching` (same model, same machine, one
server at a time): our server holds one adapter and every other request is for the base model (mixed
batches); the peer serves the base model. The peer has no `ignore_eos`, so both sides get the prompts of
`LONG_PROMPTS`, whose greedy replies run past 64 tokens, and a request counts only if it got exactly
`--max-tokens` tokens. `--clients` may list several loads (`32,64`); each runs `--requests` = 2 x clients
unless given. Prints output tokens/s of both and the ratio slimtune / peer, pooled over the rounds.

    python bench/serve_load.py --mode peer --clients 32,64 --max-tokens 32 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
API_KEY = "bench-key"

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "List three uses of a paper clip.",
    "Summarise the plot of a detective story in two sentences.",
    "What should I pack for a weekend hike?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give me a recipe idea with rice, eggs and spinach.",
    "Why is the sky blue? Answer briefly.",
]

# Prompts whose greedy replies from the bundled model run past 64 tokens (the peer cannot ignore EOS).
LONG_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "List three uses of a paper clip.",
    "What should I pack for a weekend hike?",
    "Give me a recipe idea with rice, eggs and spinach.",
    "Describe a busy market in the morning.",
]


def make_adapters(model: str, root: Path, count: int, rank: int) -> list[str]:
    """`count` random LoRA adapters on `model` under `root`; returns their names."""
    import torch

    from slimtune.adapters import save_lora_adapter
    from slimtune.methods.lora import attach_lora, lora_layers
    from slimtune.models import load_model

    names = []
    for index in range(count):
        base, _, _ = load_model(model)
        attach_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"], r=rank, alpha=2.0 * rank)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for layer in lora_layers(base).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.02)
        name = f"adapter{index}"
        save_lora_adapter(base, root / name, base_model=model)
        names.append(name)
    return names


class Server:
    """`slimtune serve ...` in a subprocess on a free port; its log goes to `log_path`."""

    def __init__(self, args: list[str], cwd: Path, log_path: Path, threads: int | None = None,
                 startup_timeout: float = 600) -> None:
        env = {**os.environ, "SLIMTUNE_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen([sys.executable, "-m", "slimtune.cli", "serve", "--port", "0", *args],
                                        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = log_path.open("w", encoding="utf-8")
        self.url: str | None = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.process.stderr:
                self.log.write(line)
                self.log.flush()
                found = re.search(r"at (http://[\d.]+:\d+)/v1", line)
                if found:
                    self.url = found.group(1)
                if "Application startup complete" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(startup_timeout) or self.url is None or self.process.poll() is not None:
            raise RuntimeError(f"the server did not start; see {log_path}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


class PeerServer:
    """`transformers serve --continuous-batching MODEL` in a subprocess on a free port (the model preloaded)."""

    def __init__(self, model_dir: str, log_path: Path, threads: int | None = None, dtype: str = "auto",
                 startup_timeout: float = 600) -> None:
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        transformers_cli = Path(sys.executable).with_name("transformers")
        self.log = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen([str(transformers_cli), "serve", "--continuous-batching", "--device", "cpu",
                                         "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, model_dir],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the peer did not start; see {log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


async def one_request(client, model: str, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    reason = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if ignore_eos else None)
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, counted and shown
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    ok = reason == "length" and tokens == max_tokens
    return {"ok": ok, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens,
            "error": None if ok else f"finish_reason {reason}, {tokens} tokens"}


async def run_load(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int,
                   duration: float | None, ignore_eos: bool = True) -> dict:
    """`clients` workers take requests from the list in turn (cycling through it for `duration` seconds, if
    given); returns the summary."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=1800) as client:
        await one_request(client, requests[0][0], "Hello", 4, ignore_eos)  # warm-up: first-call costs stay out of the figures
        results: list[dict] = []
        next_index = 0
        start = time.perf_counter()
        deadline = start + duration if duration else None

        async def worker() -> None:
            nonlocal next_index
            while True:
                if deadline is None and next_index >= len(requests):
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                model, prompt = requests[next_index % len(requests)]
                next_index += 1
                results.append(await one_request(client, model, prompt, max_tokens, ignore_eos))

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    latencies = sorted(r["latency"] for r in good)
    ttfts = sorted(r["ttft"] for r in good if r["ttft"] is not None)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"requests": len(results), "failures": len(results) - len(good), "wall_s": wall,
            "latency_p50_s": statistics.median(latencies) if latencies else float("nan"),
            "latency_p95_s": pct(latencies, 0.95),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p95_s": pct(ttfts, 0.95),
            "output_tokens": sum(r["tokens"] for r in good),
            "output_tokens_per_s": sum(r["tokens"] for r in good) / wall,
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model (slimtune.models.resolve_model name)")
    parser.add_argument("--clients", default="64", help="concurrent clients; several loads: 32,64")
    parser.add_argument("--requests", type=int, help="requests in all per load (default 2 x clients; ignored with "
                        "--duration)")
    parser.add_argument("--duration", type=float, help="send requests for this many seconds instead of a fixed count")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--adapters", type=int, default=4, help="adapters on the mixed server")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mode", choices=["compare", "mixed", "merged", "peer"], default="compare",
                        help="compare: mixed vs merged; peer: slimtune (half adapter, half base) vs transformers serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of each server")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's choice)")
    parser.add_argument("--dtype", default="auto", help="weights' dtype of every server (auto: as loaded, fp32; "
                        "bfloat16)")
    parser.add_argument("--peer-dtype", help="the peer's weights' dtype (default: --dtype)")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from slimtune.api import merge_run
    from slimtune.models import resolve_model

    model_dir = resolve_model(args.model)
    rng = random.Random(args.seed)
    loads = [int(c) for c in str(args.clients).split(",")]
    peer = args.mode == "peer"
    if peer:
        args.adapters = 1
    with tempfile.TemporaryDirectory(prefix="slimtune-serve-bench-") as tmp:
        root = Path(tmp)
        print(f"making {args.adapters} random rank-{args.rank} adapters on {args.model} ...", flush=True)
        names = make_adapters(model_dir, root, args.adapters, args.rank)
        modes = {"compare": ["mixed", "merged"], "peer": ["half", "peer"]}.get(args.mode, [args.mode])
        merged = merge_run(root / names[0], root / "merged") if "merged" in modes else None
        server_args = {
            "mixed": ["--model", model_dir, "--adapter-root", str(root), *(f"--adapter={n}={n}" for n in names)],
            "half": ["--model", model_dir, "--adapter-root", str(root), f"--adapter={names[0]}={names[0]}"],
            "merged": ["--model", str(merged), "--adapter-root", str(root)],
        }
        for mode_args in server_args.values():
            mode_args += ["--dtype", args.dtype]
        rounds: list[dict] = []
        for clients in loads:
            count = args.requests or 2 * clients
            prompts = [rng.choice(LONG_PROMPTS if peer else PROMPTS) for _ in range(count)]
            requests = {
                "mixed": [(rng.choice(names), prompt) for prompt in prompts],
                "merged": [(str(merged), prompt) for prompt in prompts],
                # every other request for the adapter, the others for the base model (whose id is --model)
                "half": [(names[0] if i % 2 == 0 else model_dir, prompt) for i, prompt in enumerate(prompts)],
                "peer": [(model_dir, prompt) for prompt in prompts],
            }
            for round_index in range(args.rounds):
                for mode in modes if round_index % 2 == 0 else modes[::-1]:
                    log_path = root / f"{mode}-{clients}-{round_index}.log"
                    if mode == "peer":
                        server = PeerServer(model_dir, log_path, args.threads, args.peer_dtype or args.dtype)
                    else:
                        server = Server(server_args[mode], root, log_path, args.threads)
                    try:
                        print(f"round {round_index + 1}, {mode}: {clients} clients ...", flush=True)
                        result = asyncio.run(run_load(server.url, requests[mode], clients, args.max_tokens,
                                                      args.duration, ignore_eos=mode != "peer"))
                    finally:
                        server.stop()
                    rounds.append({"clients": clients, "round": round_index + 1, "mode": mode, **result})

    print()
    print(f"{args.max_tokens} output tokens per request, model {args.model}, {os.cpu_count()} CPU cores, "
          f"server threads: {args.threads or 'default'}, weights: {args.dtype}"
          + (f" (peer: {args.peer_dtype or args.dtype})" if peer else ""))
    print("| server | clients | round | requests | failures | latency p50 / p95 s | TTFT p50 / p95 s | output tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"mixed": f"{args.adapters} adapters, mixed batches", "merged": "one merged model",
              "half": "slimtune serve, half adapter / half base", "peer": "transformers serve --continuous-batching"}
    for r in rounds:
        print(f"| {labels[r['mode']]} | {r['clients']} | {r['round']} | {r['requests']} | {r['failures']} | "
              f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
              f"{r['output_tokens_per_s']:.1f} |")
        for error in r["errors"]:
            print(f"  failure: {error}")
    results: dict = {"rounds": rounds, "pooled_tokens_per_s": {}}
    print()
    for clients in loads:
        mine = [r for r in rounds if r["clients"] == clients]
        pooled = {mode: sum(r["output_tokens"] for r in mine if r["mode"] == mode) /
                  sum(r["wall_s"] for r in mine if r["mode"] == mode) for mode in modes}
        results["pooled_tokens_per_s"][clients] = pooled
        if len(modes) == 2:
            ours, theirs = modes
            ratio = pooled[ours] / pooled[theirs]
            results.setdefault("ratio", {})[clients] = ratio
            goal = "goal >= 2" if peer else "goal >= 0.8"
            print(f"{clients} clients, pooled output tokens/s: {ours} {pooled[ours]:.1f}, {theirs} {pooled[theirs]:.1f}; "
                  f"{ours} / {theirs} = {ratio:.2f} ({goal}); failures {sum(r['failures'] for r in mine)}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
