"""slimtune side of the training-speed benchmark: one configuration per process.

Trains LoRA (r=16, alpha=32, dropout 0.05, q/k/v/o, linear schedule without warmup: the peer's
hyperparameters) through `slimtune.finetune`, then measures the response-token eval loss with the very
same code the peer uses (`peer_trainer.response_eval_loss`: fp32 base + the saved adapter loaded by
PEFT), so both sides are judged by one yardstick.

    python bench/slimtune_runner.py --model-dir DIR --train T.jsonl [--eval E.jsonl] [--precision auto]
        [--packing] [--grad-checkpointing] [--batch-size 4] [--lr 2e-4] [--json-out R.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_trainer import _peak_rss_mb, response_eval_loss, response_features, rows_from_jsonl  # noqa: E402
from step_profile import StepClock  # noqa: E402


@contextlib.contextmanager
def _clocked(clock: StepClock):
    """Inside the block the loop ticks `clock` at the start of every optimizer step (it calls `train_step`
    once a step); the loop's own function comes back afterwards, so runs in one process (bench/gpu_check.py)
    do not stack clocks."""
    import slimtune.train.loop as loop

    inner = loop.train_step

    def train_step(*args, **kwargs):
        clock.tick()
        return inner(*args, **kwargs)

    loop.train_step = train_step
    try:
        yield
    finally:
        loop.train_step = inner
        clock.finish()  # closes a profile a short run left open


def _eval_loss(args: argparse.Namespace, run_dir: Path, device: torch.device) -> float:
    """Response-token loss of the saved adapter on `args.eval`, measured by the peer's fp32 code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    if args.quantize != "none":
        # A QLoRA adapter belongs to the 4-bit base: evaluate it on the NF4-dequantized weights.
        from slimtune.quant import dequantize_model, quantize_model

        quantize_model(base, compute_dtype=torch.float32)
        dequantize_model(base, torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir)).to(device)
    features = response_features(tokenizer, rows_from_jsonl(args.eval), args.max_length)
    return response_eval_loss(model, features, tokenizer.pad_token_id, device, batch_size=8)[0]


def run(args: argparse.Namespace) -> dict:
    import slimtune
    from slimtune.config import build_config
    from rich.console import Console

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="slimtune-bench-"))
    cfg = build_config({
        "model": args.model_dir, "output": str(work / "run"), "overwrite": True, "method": args.method,
        # AdaLoRA reads lora.alpha, dropout and targets; its ranks come from adalora.* below.
        "lora": {**({} if args.method == "adalora" else {"r": 16}), "alpha": 32, "dropout": args.lora_dropout,
                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"train": args.train, "max_length": args.max_length},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.0,
                  "schedule": "linear", "seed": args.seed, "precision": args.precision,
                  "packing": args.packing, "grad_checkpointing": args.grad_checkpointing,
                  "checkpoint_fraction": args.checkpoint_fraction,
                  **({"mmap_threshold_mb": args.mmap_threshold_mb or None}
                     if args.mmap_threshold_mb is not None else {}),
                  "trim_memory": args.trim_memory,
                  "log_every": 10, "optimizer": args.optimizer, "save_every": None, "compile": args.compile,
                  **({"max_steps": args.steps} if args.steps else {}),
                  **({"attention_precision": args.attention_precision} if args.attention_precision else {}),
                  **({"threads": args.threads} if args.threads else {}),
                  **({"pad_to_multiple_of": args.pad_to_multiple_of} if args.pad_to_multiple_of else {})},
        **({"quantize": args.quantize} if args.quantize != "none" else {}),
        # AdaLoRA at LoRA's initial rank and scale (alpha / init_r = 32 / 16), pruned to an average of 8.
        **({"adalora": {"init_r": 16, "target_r": 8}} if args.method == "adalora" else {}),
    })
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(args.profile_from, args.profile_steps)
    with _clocked(clock):
        result = slimtune.finetune(cfg, Console(stderr=True, quiet=True), on_trained=lambda summary: clock.finish())
    train_end = time.time()
    peak_rss = _peak_rss_mb()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eval_loss = _eval_loss(args, result.output, device) if args.eval else None
    name = "slimtune " + result.precision + (" packed" if result.packing else " padded")
    if args.method != "lora":
        name += f" {args.method.upper()}"
    if args.quantize != "none":
        name += f" QLoRA ({args.quantize} base)"
    if args.optimizer != "adamw":
        name += f" {args.optimizer}"
    if args.grad_checkpointing:
        name += " +ckpt" + (f" {args.checkpoint_fraction:g} of layers" if args.checkpoint_fraction < 1 else "")
    if args.mmap_threshold_mb is not None:
        name += f" mmap>={args.mmap_threshold_mb:g}MB" if args.mmap_threshold_mb else " glibc mmap threshold"
    if args.trim_memory:
        name += " +trim"
    if args.compile != "false":
        name += f" compile={args.compile}"
    if args.attention_precision:
        name += f" attention {args.attention_precision}"
    if args.threads:
        name += f" {args.threads} threads"
    return {**clock.summary(result.tokens, args.warmup_steps), "train_end_unix": train_end,
        "name": name, "tokens": result.tokens, "examples": result.examples, "train_s": result.train_seconds,
        "tokens_per_s": result.tokens_per_s, "s_per_example": result.train_seconds / max(result.examples, 1),
        "peak_rss_mb": peak_rss, "peak_gpu_mb": peak_gpu, "eval_loss": eval_loss, "steps": result.steps,
        "precision": result.precision, "device": device.type,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", help="eval JSONL (without it no eval loss is measured)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--packing", action="store_true", help="train.packing=true (default: padded, length-grouped)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-fraction", type=float, default=1.0, help="train.checkpoint_fraction")
    parser.add_argument("--mmap-threshold-mb", type=float, help="train.mmap_threshold_mb (0: null, glibc's own threshold)")
    parser.add_argument("--trim-memory", action="store_true", help="train.trim_memory=true")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"])
    parser.add_argument("--method", default="lora", choices=["lora", "dora", "adalora"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="lora.dropout (the peer's 0.05)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pad-to-multiple-of", type=int, default=None, help="train.pad_to_multiple_of (default: its default)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="train.compile")
    parser.add_argument("--attention-precision", choices=["auto", "fp32", "bf16"], help="train.attention_precision")
    parser.add_argument("--threads", type=int, help="train.threads")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the steady-state figures")
    parser.add_argument("--profile-from", type=int, default=5, help="first profiled step")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: no profile)")
    parser.add_argument("--work-dir")
    parser.add_argument("--json-out")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
