"""LongLoRA on the bundled model (SmolLM2-135M-Instruct, native context 8192): quality and cost.

Two phases, each runnable alone:

  cost     one training step (forward + backward, bf16, LongLoRA attached) with S2-Attn vs full attention
           at --length tokens, each in a fresh process so peak RSS is that step's; seconds and peak RSS.
  quality  long real text that ships with Python: the standard library's longest .py files, alternate
           files for training and evaluation (disjoint). Four models: the base; the base with position
           interpolation only (RoPE factor ceil(context / 8192), untrained); LoRA-only (longlora with
           trainable: [], LoRA on q/k/v/o); LongLoRA (LoRA + embeddings + norms). Perplexity at each of
           --lengths on the held-out files, passkey retrieval at --passkey-length for base and LongLoRA.
           Training goes through `slimtune.finetune` (method: longlora), rows of --train-length tokens.

The issue's full setting (16k context, rows of 16384 tokens, perplexity at 4k/8k/16k, passkey at 16k):
    python bench/longlora.py --phase quality --context 16384 --train-length 16384 --steps 200 \\
        --lengths 4096,8192,16384 --passkey-length 16384
    python bench/longlora.py --phase cost --length 16384
    python bench/longlora.py --phase cost --attention-only --length 16384   # the attention op alone
Results: JSON and a markdown table in --out (default bench/results/), plot longlora_ppl.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stdlib_files(count: int) -> tuple[list[Path], list[Path]]:
    """The `2 * count` longest .py files of the standard library (tests and site-packages left out),
    alternately into (train, eval): disjoint files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
             and "tests" not in p.parts and "idlelib" not in p.parts]
    files = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[: 2 * count]
    return files[0::2], files[1::2]


def training_rows(files: list[Path], tokenizer, length: int, rows: int) -> list[dict]:
    """`rows` chat rows whose reply is a window of about `length` tokens of the training files."""
    from slimtune.evaluate_lengths import token_stream

    stream = token_stream(tokenizer, [f.read_text(encoding="utf-8", errors="replace") for f in files])
    size = length - 48  # room for the chat template around the reply
    if len(stream) < size * rows:
        raise SystemExit(f"the training files hold {len(stream)} tokens, fewer than {rows} rows of {size}")
    return [{"messages": [{"role": "user", "content": "Continue this Python source file."},
                          {"role": "assistant", "content": tokenizer.decode(stream[i * size: (i + 1) * size])}]}
            for i in range(rows)]


def train_variant(name: str, data: Path, out: Path, args, trainable: list[str]) -> float:
    from rich.console import Console

    from slimtune.api import finetune
    from slimtune.config import build_config

    cfg = build_config({
        "model": "smollm2-135m", "method": "longlora", "output": str(out / name), "overwrite": True,
        "data": {"train": str(data), "max_length": args.train_length},
        "longlora": {"context": args.context, "trainable": trainable},
        "train": {"max_steps": args.steps, "batch_size": 1, "lr": args.lr, "warmup_ratio": 0.0, "save_every": None,
                  "grad_checkpointing": True, "attention_precision": args.maths},
    })
    started = time.perf_counter()
    finetune(cfg, Console(stderr=True))
    return time.perf_counter() - started


def quality(args) -> dict:
    import torch

    from slimtune.api import load_run
    from slimtune.evaluate_lengths import passkey_accuracy, token_stream, window_perplexity
    from slimtune.methods.longlora import interpolate_positions, interpolation_factor
    from slimtune.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = stdlib_files(args.files)
    base, tokenizer, _ = load_model("smollm2-135m")
    eval_stream = token_stream(tokenizer, [f.read_text(encoding="utf-8", errors="replace") for f in eval_files])
    data = out / "longlora_train.jsonl"
    rows = training_rows(train_files, tokenizer, args.train_length, args.steps)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lengths = [int(x) for x in args.lengths.split(",")]
    report: dict = {"train_files": [f.name for f in train_files], "eval_files": [f.name for f in eval_files],
                    "eval_tokens": len(eval_stream), "steps": args.steps, "train_length": args.train_length,
                    "context": args.context, "lr": args.lr, "models": {}}

    previous = json.loads((out / "longlora_quality.json").read_text()) if args.resume and \
        (out / "longlora_quality.json").exists() else {}
    same_eval = all(previous.get(k) == report[k] for k in ("eval_files", "eval_tokens", "context"))

    def measure(name: str, model, passkey: bool) -> None:
        kept = previous.get("models", {}).get(name, {})
        if same_eval and name in ("base", f"interpolation only (x{factor})") and all(str(n) in kept for n in lengths) \
                and (not passkey or "passkey" in kept or not args.passkey_length):
            report["models"][name] = kept  # untrained rows do not depend on the training settings
            print(f"{name}: kept from the previous run ({kept})", flush=True)
            return
        model.eval()
        row = {}
        with torch.no_grad():
            for length in lengths:
                started = time.perf_counter()
                row[str(length)] = window_perplexity(model, eval_stream, length, 1)["perplexity"]
                print(f"{name} ppl@{length}: {row[str(length)]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
            if passkey and args.passkey_length:
                row["passkey"] = passkey_accuracy(model, tokenizer, args.passkey_length, args.passkey_trials)
                print(f"{name} passkey@{args.passkey_length}: {row['passkey']:.0%}", flush=True)
        report["models"][name] = row
        (out / "longlora_quality.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    factor = interpolation_factor(base.config, args.context)
    measure("base", base, passkey=True)
    interpolate_positions(base, factor)
    measure(f"interpolation only (x{factor})", base, passkey=False)
    del base
    for name, trainable in (("LoRA-only", []), ("LongLoRA", ["embed", "norm"])):
        seconds = train_variant(name, data, out / "runs", args, trainable)
        model, _ = load_run(out / "runs" / name)
        measure(name, model, passkey=name == "LongLoRA")
        report["models"][name]["train_seconds"] = round(seconds, 1)
        del model
    (out / "longlora_quality.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, lengths, out / "longlora_ppl.png")
    return report


def plot(report: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, row in report["models"].items():
        axis.plot(lengths, [row[str(n)] for n in lengths], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("perplexity (held-out stdlib files)")
    axis.set_title(f"SmolLM2-135M, context {report['context']}: {report['steps']} steps of {report['train_length']}")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def one_step(args) -> None:
    """In its own process: one LongLoRA training step at --length tokens; prints JSON."""
    import contextlib

    import torch
    from rich.console import Console

    from slimtune.config import build_config
    from slimtune.models import load_model
    from slimtune.train.loss import response_loss_sum

    model, _, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    cfg = build_config({"method": "longlora", "data": {"train": "unused.jsonl"}, "longlora": {"context": args.context}})
    attached = cfg.plugin.attach(model, cfg, Console(quiet=True))
    from slimtune.methods.s2_attention import group_layout
    from slimtune.train.packing import set_cpu_attention_maths, use_packed_attention
    from slimtune.train.tuning import cpu_attention_maths

    if args.attention == "full":  # slimtune's own causal attention (packing.py), as a training run has
        use_packed_attention(model)
    # The CPU attention maths a run would use for this span (measured per machine and length band)
    span = group_layout(args.length, 0.25)[0] if args.attention == "s2" else args.length
    maths = cpu_attention_maths(args.maths, span)
    set_cpu_attention_maths(maths)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    patches = attached.training_patches() if args.attention == "s2" else contextlib.nullcontext()
    with patches:
        for _ in range(args.repeat):  # the last step is reported: the first ones pay kernel warm-up
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = response_loss_sum(model, {"input_ids": ids, "labels": ids})
            forward = time.perf_counter() - started
            loss.backward()
            total = time.perf_counter() - started
            model.zero_grad(set_to_none=True)
    print(json.dumps({"attention": args.attention, "maths": maths, "length": args.length, "forward_s": round(forward, 1),
                      "step_s": round(total, 1), "steps_run": args.repeat,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def attention_step(args) -> None:
    """In its own process: S2-Attn or causal SDPA alone on SmolLM2-135M's attention shape (9 heads, 3 KV
    heads, dim 64, bf16) at --length tokens, forward + backward; prints JSON."""
    import torch
    import torch.nn.functional as F

    from slimtune.methods.s2_attention import RealMask, shifted_sparse_attention
    from transformers.masking_utils import causal_mask_function

    generator = torch.Generator().manual_seed(0)
    shape = (1, 9, args.length, 64)
    query = torch.randn(shape, generator=generator).bfloat16().requires_grad_(True)
    key, value = (torch.randn((1, 3, args.length, 64), generator=generator).bfloat16().requires_grad_(True)
                  for _ in range(2))
    for _ in range(args.repeat):
        started = time.perf_counter()
        if args.attention == "s2":
            mask = RealMask(causal_mask_function, None, 1, args.length, torch.device("cpu"))
            out = shifted_sparse_attention(query, key, value, mask, 0.25)
        else:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        out.float().square().mean().backward()
        seconds = time.perf_counter() - started
    print(json.dumps({"attention": args.attention, "length": args.length, "step_s": round(seconds, 2),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def cost(args) -> dict:
    results = {}
    for attention in ("s2", "full"):
        phase = "attention-step" if args.attention_only else "step"
        command = [sys.executable, __file__, "--phase", phase, "--attention", attention, "--maths", args.maths,
                   "--length", str(args.length),
                   "--context", str(args.context), "--repeat", str(args.repeat)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[attention] = json.loads(output.strip().splitlines()[-1])
        print(results[attention], flush=True)
    results["ratio_step_s"] = round(results["s2"]["step_s"] / results["full"]["step_s"], 3)
    results["ratio_peak_rss"] = round(results["s2"]["peak_rss_mb"] / results["full"]["peak_rss_mb"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"longlora_cost_{'attention_' if args.attention_only else ''}{args.length}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["quality", "cost", "step", "attention-step"], required=True)
    parser.add_argument("--attention-only", action="store_true", help="cost phase: the attention op alone, not a "
                        "whole model step")
    parser.add_argument("--context", type=int, default=16384, help="longlora.context (RoPE factor ceil(context/8192))")
    parser.add_argument("--train-length", type=int, default=16384, help="tokens per training row")
    parser.add_argument("--steps", type=int, default=200, help="training steps (batch 1) per trained model")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--files", type=int, default=20, help="stdlib files for training and as many for evaluation")
    parser.add_argument("--lengths", default="4096,8192,16384", help="perplexity lengths")
    parser.add_argument("--passkey-length", type=int, default=16384)
    parser.add_argument("--passkey-trials", type=int, default=5)
    parser.add_argument("--length", type=int, default=16384, help="cost phase: tokens per step")
    parser.add_argument("--attention", choices=["s2", "full"], default="s2")
    parser.add_argument("--maths", choices=["auto", "fp32", "bf16"], default="auto", help="CPU attention maths "
                        "(train.attention_precision; auto: this machine's measured choice for the span)")
    parser.add_argument("--repeat", type=int, default=2, help="cost phase: steps per process (the last is timed)")
    parser.add_argument("--resume", action="store_true", help="quality phase: keep the base and interpolation-only "
                        "rows of a previous run on the same eval files (they do not depend on training)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    {"quality": quality, "cost": cost, "step": one_step, "attention-step": attention_step}[args.phase](args)


if __name__ == "__main__":
    main()
