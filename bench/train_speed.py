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

    python bench/train_speed.py                       # default: 96 examples, 1 round
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
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CONFIGS: dict[str, list[str]] = {
    "peer-fp32": [str(HERE / "peer_trainer.py")],
    "peer-bf16": [str(HERE / "peer_trainer.py"), "--bf16"],
    "slimtune": [str(HERE / "slimtune_runner.py")],
    "slimtune-fp32": [str(HERE / "slimtune_runner.py"), "--precision", "fp32"],
    "slimtune-packed": [str(HERE / "slimtune_runner.py"), "--packing"],
    "slimtune-ckpt": [str(HERE / "slimtune_runner.py"), "--grad-checkpointing"],
    "slimtune-ckpt-half": [str(HERE / "slimtune_runner.py"), "--grad-checkpointing", "--checkpoint-fraction", "0.5"],
    "slimtune-glibc-mmap": [str(HERE / "slimtune_runner.py"), "--mmap-threshold-mb", "0"],
    "slimtune-trim": [str(HERE / "slimtune_runner.py"), "--trim-memory"],
    "slimtune-8bit-adam": [str(HERE / "slimtune_runner.py"), "--optimizer", "adamw8bit"],
    "slimtune-dora": [str(HERE / "slimtune_runner.py"), "--method", "dora"],
    "slimtune-adalora": [str(HERE / "slimtune_runner.py"), "--method", "adalora"],
    "slimtune-qlora": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4"],
    "slimtune-qlora-trim": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4", "--trim-memory"],
    "slimtune-qlora-fp32": [str(HERE / "slimtune_runner.py"), "--quantize", "nf4", "--precision", "fp32"],
}
DEFAULT_CONFIGS = "peer-fp32,peer-bf16,slimtune,slimtune-trim,slimtune-packed,slimtune-fp32,slimtune-ckpt-half,slimtune-ckpt"


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


def run_config(name: str, model_dir: str, train: str, eval_: str, out: Path, slimtune_args: list[str]) -> dict:
    extra = slimtune_args if name.startswith("slimtune") else []
    command = [sys.executable, *CONFIGS[name], *extra, "--model-dir", model_dir, "--train", train, "--eval", eval_,
               "--json-out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(out.read_text())


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
    args = parser.parse_args()

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
            result = run_config(name, model_dir, str(train), args.eval_file, work / f"{name}-{round_index}.json",
                                args.slimtune_args.split())
            runs[name].append(result)
            print(f"  round {round_index + 1} {name}: {result['tokens_per_s']:.0f} tok/s, "
                  f"{result['peak_rss_mb']:.0f} MB, eval loss {result['eval_loss']:.4f}", flush=True)

    summary = []
    for name, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        precision = "bf16" if ("bf16" in name or results[0].get("precision") == "bf16") else "fp32"
        summary.append({
            "config": name, "label": results[0]["name"], "tokens_per_s": tps,
            "s_per_example": statistics.median(r["s_per_example"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_gpu_mb": results[0].get("peak_gpu_mb"),
            "eval_loss": statistics.median(r["eval_loss"] for r in results),
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
    print("| configuration | tokens/s | s/example | peak RSS MB | eval loss | % bf16 peak | speed vs fastest peer "
          "| RSS vs fastest peer | step time vs slimtune LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in summary:
        speed = f"{row['tokens_per_s'] / fastest['tokens_per_s']:.2f}x" if fastest else "-"
        memory = f"{row['peak_rss_mb'] / fastest['peak_rss_mb']:.2f}x" if fastest else "-"
        versus_lora = f"{row['step_time_vs_lora']:.2f}x" if lora else "-"
        print(f"| {row['label']} | {row['tokens_per_s']:.0f} | {row['s_per_example']:.3f} | {row['peak_rss_mb']:.0f} | "
              f"{row['eval_loss']:.4f} | {row['pct_bf16_peak']:.1f}% | {speed} | {memory} | {versus_lora} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"peaks_gflops": peaks, "flops_per_token": per_token,
                                                   "examples": args.examples, "summary": summary,
                                                   "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
