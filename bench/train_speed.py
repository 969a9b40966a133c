"""Training speed and memory: slimtune vs transformers Trainer + PEFT LoRA, side by side.

Same model (the bundled SmolLM2-135M-Instruct), same examples, same hyperparameters (LoRA r=16,
alpha 32, dropout 0.05 on q/k/v/o; batch 4; lr 2e-4; one epoch), on one machine in one invocation.
Each configuration runs in a fresh process (peak RSS is per process) and the configurations
alternate over `--rounds`, so slow drifts of the machine hit every configuration alike.

Reported per configuration: trained tokens/s (real prompt + response tokens, no padding), seconds
per example, peak RSS (and peak GPU memory on a GPU), response-token eval loss after training
(measured by the same fp32 code for every configuration), and the fraction of the machine's
measured matmul peak reached, where a LoRA step costs ~4 x (non-embedding + LM-head params) FLOPs
per token. Ratios are against the fastest peer configuration.

Per configuration it also prints where a step's time goes (torch.profiler over steps 8-10 of a second,
short process, operator self times by category: bench/step_profile.py; the measured run has no profiler,
which slowed the peer's later steps and raised its peak RSS when both ran in one process), steady-state
tokens/s (the median step after the first 3: compile time excluded), and the wall time of the whole
process: start-up (imports, model load, compile) until training ends, and that projected to a 150-step
run (start-up + first steps as measured + the remaining steps at the steady step time;
`--examples 600 --steps 150` measures a real one instead).

    python bench/train_speed.py                       # default: peers, slimtune eager and compiled, 96 examples
    python bench/train_speed.py --quick               # smoke check: 24 examples, bf16 peer and slimtune, no eval
    python bench/train_speed.py --examples 200 --rounds 2 --json-out bench/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CONFIGS: dict[str, list[str]] = {
    "peer-fp32": [str(HERE / "peer_trainer.py")],
    "peer-bf16": [str(HERE / "peer_trainer.py"), "--bf16"],
    "slimtune": [str(HERE / "slimtune_runner.py")],
    "slimtune-fp32": [str(HERE / "slimtune_runner.py"), "--precision", "fp32"],
    "slimtune-compile": [str(HERE / "slimtune_runner.py"), "--compile", "true"],
    "slimtune-eager": [str(HERE / "slimtune_runner.py"), "--compile", "false"],
    "slimtune-attn-bf16": [str(HERE / "slimtune_runner.py"), "--attention-precision", "bf16"],
    "slimtune-attn-fp32": [str(HERE / "slimtune_runner.py"), "--attention-precision", "fp32"],
    "slimtune-1-thread": [str(HERE / "slimtune_runner.py"), "--threads", "1"],
    "slimtune-packed": [str(HERE / "slimtune_runner.py"), "--packing"],
    "slimtune-ckpt": [str(HERE / "slimtune_runner.py"), "--grad-checkpointing"],
    "slimtune-ckpt-half": [str(HERE / "slimtune_runner.py"), "--grad-checkpointing", "--checkpoint-fraction", "0.5"],
    "slimtune-glibc-mmap": [str(HERE / "slimtune_runner.py"), "--mmap-threshold-mb", "0"],
    "slimtune-mmap-1mb": [str(HERE / "slimtune_runner.py"), "--mmap-threshold-mb", "1"],
    "slimtune-mmap-256kb": [str(HERE / "slimtune_runner.py"), "--mmap-threshold-mb", "0.25"],
    "slimtune-trim": [str(HERE / "slimtune_runner.py"), "--trim-memory"],
    "slimtune-8bit-adam": [str(HERE / "slimtune_runner.py"), "--optimizer", "adamw8bit"],
    "slimtune-dora": [str(HERE / "slimtune_runner.py"), "--method", "dora"],
    "slimtune-adalora": [str(HERE / "slimtune_runner.py"), "--method", "adalora"],
    "slimtune-qlora": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4"],
    "slimtune-qlora-trim": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4", "--trim-memory"],
    "slimtune-qlora-fp32": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4", "--precision", "fp32"],
}
DEFAULT_CONFIGS = "peer-fp32,peer-bf16,slimtune,slimtune-compile"
QUICK_CONFIGS = "peer-bf16,slimtune"  # with --quick: 24 examples (6 steps), no eval
WHOLE_RUN_STEPS = 150


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 1.5) -> float:
    """Best observed GFLOP/s of a (size x size) @ (size x size) matmul in `dtype` on this device."""
    from slimtune.plan import matmul_peak_flops

    return matmul_peak_flops(dtype, size, seconds) / 1e9


def flops_per_token(model_dir: str) -> float:
    """~4 x (non-embedding params + LM-head params): forward 2N, backward to activations 2N."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head = model.get_output_embeddings().weight.numel()
    return 4.0 * (total - embedding + head)


def _run(name: str, command: list[str]) -> float:
    """Run one runner process; returns its launch time (unix)."""
    launched = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
    return launched


def run_config(name: str, model_dir: str, train: str, eval_: str | None, out: Path, slimtune_args: list[str],
               common: list[str], profile: tuple[int, int] | None) -> dict:
    """The measured run (no profiler: torch.profiler left the peer's later steps 15-30% slower and added
    ~0.6 GB to its peak RSS, so figures taken beside a profile flatter whoever is profiled less), then,
    when `profile` = (first step, steps), a second, short process that profiles those steps and is
    measured for nothing else."""
    extra = slimtune_args if name.startswith("slimtune") else []
    base = [sys.executable, *CONFIGS[name], *extra, *common, "--model-dir", model_dir, "--train", train]
    launched = _run(name, [*base, *(["--eval", eval_] if eval_ else []), "--profile-steps", "0",
                           "--json-out", str(out)])
    result = json.loads(out.read_text())
    # Whole-process figures: from launch (imports, model load, compile) to the end of training.
    result["startup_s"] = result["train_started_unix"] - launched
    result["wall_to_trained_s"] = result["train_end_unix"] - launched
    steps = len(result["step_times"])
    warm = min(3, steps)
    result["wall_150_s"] = (result["startup_s"] + sum(result["step_times"][:warm])
                            + (WHOLE_RUN_STEPS - warm) * result["steady_step_s"])
    if profile:
        first, count = profile
        profiled = out.with_name(out.stem + "-profile.json")
        _run(name, [*base, "--steps", str(first + count), "--profile-from", str(first), "--profile-steps", str(count),
                    "--json-out", str(profiled)])
        measured = json.loads(profiled.read_text())
        result["profile_s_per_step"], result["top_ops"] = measured["profile_s_per_step"], measured["top_ops"]
    return result


def print_breakdown(name: str, result: dict) -> None:
    """One line per configuration: seconds per step by profiler category, and shares of the step."""
    from step_profile import CATEGORIES

    profile = result.get("profile_s_per_step")
    if not profile:
        return
    total = sum(profile.values())
    parts = ", ".join(f"{category} {1e3 * profile[category]:.0f} ms ({100 * profile[category] / total:.0f}%)"
                      for category in CATEGORIES)
    print(f"    {name} profiled step {1e3 * total:.0f} ms: {parts}", flush=True)
    top = "; ".join(f"{op} {1e3 * seconds:.0f}" for _, op, seconds in result.get("top_ops", [])[:8])
    print(f"      top operators (ms/step): {top}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96, help="training examples (first N of the train file)")
    parser.add_argument("--train-file", default=str(ROOT / "examples/data/extract_train.jsonl"))
    parser.add_argument("--eval-file", default=str(ROOT / "examples/data/extract_eval.jsonl"))
    parser.add_argument("--model", default="smollm2-135m", help="model name for slimtune.models.resolve_model")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json-out")
    parser.add_argument("--slimtune-args", default="", help="extra runner flags for every slimtune config, e.g. '--packing'")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: one epoch of --examples)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-configuration profile runs")
    parser.add_argument("--quick", action="store_true", help="smoke check: 24 examples, peer-bf16 and slimtune, "
                        "no eval, 2 profiled steps")
    args = parser.parse_args()
    if args.quick:
        args.examples = min(args.examples, 24)
        args.configs = QUICK_CONFIGS if args.configs == DEFAULT_CONFIGS else args.configs
    common = ["--warmup-steps", "2"] if args.quick else []
    # Profiled in a second process, past the first steps (and a compiled layer's compiles).
    profile = None if args.no_profile else ((3, 2) if args.quick else (8, 3))
    if args.steps:
        common += ["--steps", str(args.steps)]
    sys.path.insert(0, str(HERE))

    from slimtune.models import resolve_model

    model_dir = resolve_model(args.model)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    train = work / "train.jsonl"
    lines = Path(args.train_file).read_text(encoding="utf-8").splitlines()[: args.examples]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")

    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    per_token = flops_per_token(model_dir)
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"{per_token / 1e6:.0f} MFLOP per trained token; {args.examples} examples, {torch.get_num_threads()} threads",
          flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names:
            result = run_config(name, model_dir, str(train), None if args.quick else args.eval_file,
                                work / f"{name}-{round_index}.json", args.slimtune_args.split(), common,
                                profile if round_index == 0 else None)
            runs[name].append(result)
            eval_loss = f"{result['eval_loss']:.4f}" if result.get("eval_loss") is not None else "-"
            print(f"  round {round_index + 1} {name}: {result['tokens_per_s']:.0f} tok/s over the run, "
                  f"{result['steady_tokens_per_s']:.0f} steady, {result['peak_rss_mb']:.0f} MB, eval loss {eval_loss}, "
                  f"start-up {result['startup_s']:.1f} s, first 3 steps {result['warmup_s']:.1f} s", flush=True)
            print_breakdown(name, result)

    summary = []
    for name, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        precision = "bf16" if ("bf16" in name or results[0].get("precision") == "bf16") else "fp32"
        steady = statistics.median(r["steady_tokens_per_s"] for r in results)
        summary.append({
            "config": name, "label": results[0]["name"], "tokens_per_s": tps, "steady_tokens_per_s": steady,
            "wall_to_trained_s": statistics.median(r["wall_to_trained_s"] for r in results),
            "wall_150_s": statistics.median(r["wall_150_s"] for r in results),
            "steady_pct_bf16_peak": 100 * steady * per_token / (peaks["bf16"] * 1e9),
            "s_per_example": statistics.median(r["s_per_example"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_gpu_mb": results[0].get("peak_gpu_mb"),
            "eval_loss": (statistics.median(r["eval_loss"] for r in results)
                          if all(r.get("eval_loss") is not None for r in results) else None),
            "pct_bf16_peak": 100 * tps * per_token / (peaks["bf16"] * 1e9),
            "pct_own_peak": 100 * tps * per_token / (peaks[precision] * 1e9),
        })
    peers = [row for row in summary if row["config"].startswith("peer")]
    fastest = max(peers, key=lambda row: row["tokens_per_s"]) if peers else None
    # Step time relative to slimtune's default LoRA run (same examples, so the ratio of tokens/s):
    # the overhead of DoRA, AdaLoRA, QLoRA ... over plain LoRA.
    lora = next((row for row in summary if row["config"] == "slimtune"), None)
    for row in summary:
        row["step_time_vs_lora"] = lora["tokens_per_s"] / row["tokens_per_s"] if lora else None
    print()
    print("| configuration | tokens/s (whole run) | steady tokens/s | steady % bf16 peak | peak RSS MB | eval loss "
          "| steady speed vs fastest peer | RSS vs fastest peer | wall to trained s | 150-step wall s (projected) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in summary:
        speed = f"{row['steady_tokens_per_s'] / fastest['steady_tokens_per_s']:.2f}x" if fastest else "-"
        memory = f"{row['peak_rss_mb'] / fastest['peak_rss_mb']:.2f}x" if fastest else "-"
        eval_loss = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        print(f"| {row['label']} | {row['tokens_per_s']:.0f} | {row['steady_tokens_per_s']:.0f} | "
              f"{row['steady_pct_bf16_peak']:.1f}% | {row['peak_rss_mb']:.0f} | {eval_loss} | {speed} | {memory} | "
              f"{row['wall_to_trained_s']:.0f} | {row['wall_150_s']:.0f} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"peaks_gflops": peaks, "flops_per_token": per_token,
                                                   "examples": args.examples, "summary": summary,
                                                   "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
