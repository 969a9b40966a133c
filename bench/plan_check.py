"""`slimtune plan`'s predicted peak memory next to the measured peak, per method.

Each method trains a few steps in a fresh process (check -> build -> train, the finish stage left out:
it is not part of the training peak) on the first examples of the demo data; the child resets its peak
RSS (VmHWM) at start, so the figure is its own. The prediction is `slimtune.plan_report.make_plan` for
the very same config and data, made in this process. On a GPU the measured figure is
`torch.cuda.max_memory_allocated`.

    python bench/plan_check.py                                   # the bundled model, every method
    python bench/plan_check.py --llama 1b --methods lora,qlora   # a random Llama-shaped 1.2B model
    python bench/plan_check.py --llama 3b --methods lora,qlora   # ... 3.2B (needs ~16 GB free RAM)

Run it alone (`flock /tmp/slimtune-cpu.lock python bench/plan_check.py`): other work moves RSS too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = '''
from pathlib import Path
Path("/proc/self/clear_refs").write_text("5")  # VmHWM survives exec: start from this process's own RSS
import json, sys
from contextlib import ExitStack

def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

import torch
from rich.console import Console
from slimtune.config import build_config
from slimtune.stages import build_run, check_run
from slimtune.train.loop import run_training
from slimtune.train.prepare import training_mode

cfg = build_config(json.loads(sys.argv[1]))
console = Console(quiet=True)
checked = check_run(cfg, console)
before = rss_mb("VmRSS")
with ExitStack() as stack:
    built = build_run(checked, console, stack)
    load_peak = rss_mb("VmHWM")  # the peak up to here is the load's (QLoRA: quantization as weights arrive)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with training_mode(built.model, cfg.train, console), built.attached.training_patches():
        summary = run_training(built.model, built.attached, checked.train_set, cfg.train,
                               checked.tokenizer.pad_token_id, cfg.output / "metrics.jsonl", console,
                               device=checked.device, precision=built.precision, packing=built.packing,
                               checkpoint_dir=cfg.output / "checkpoints", runtime=built.runtime)
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"peak_rss_mb": rss_mb("VmHWM"), "rss_before_build_mb": before, "load_peak_rss_mb": load_peak, "peak_gpu_bytes": gpu,
                  "tokens_per_s": summary.tokens_per_s}))
'''

LLAMA = {  # Llama-shaped random models: (hidden, layers, heads, kv heads, MLP width); vocab = the tokenizer's
    "1b": (2048, 16, 32, 8, 8192),    # Llama 3.2 1B's shapes
    "3b": (3072, 28, 24, 8, 8192),    # Llama 3.2 3B's shapes
}


def make_llama(size: str, path: Path) -> Path:
    """A randomly initialised Llama-shaped model in bf16 safetensors, with the bundled model's tokenizer."""
    if (path / "config.json").is_file():
        return path
    script = f'''
import torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from slimtune.models import resolve_model
tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
h, layers, heads, kv, mlp = {LLAMA[size]!r}
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # never the fp32 model: 3B of fp32 is 13 GB
model = LlamaForCausalLM(config)
model.save_pretrained("{path}", safe_serialization=True)
tokenizer.save_pretrained("{path}")
'''
    subprocess.run([sys.executable, "-c", script], check=True)
    return path


def config_for(model: str, method: str, train: Path, out: Path, steps: int, batch: int,
               checkpointing: bool = False) -> dict:
    return {"model": model, "method": method, "output": str(out), "overwrite": True,
            "data": {"train": str(train), "max_length": 256},
            "train": {"max_steps": steps, "batch_size": batch, "save_every": None, "log_every": 1,
                      "warmup_ratio": 0.0, "grad_checkpointing": checkpointing}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,qlora,dora,adalora,freeze,full,longlora")
    parser.add_argument("--llama", choices=sorted(LLAMA), help="a random Llama-shaped model instead of the bundled one")
    parser.add_argument("--steps", type=int, default=2, help="2 suffice: the optimizer states exist from step 2 on")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true", help="train.grad_checkpointing=true")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    from rich.console import Console

    from slimtune.config import build_config
    from slimtune.plan import CPU_RUNTIME_BYTES, gb
    from slimtune.plan_report import make_plan
    from slimtune.stages import check_run

    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    model = "smollm2-135m"
    if args.llama:
        model = str(make_llama(args.llama, Path(tempfile.gettempdir()) / f"slimtune-plan-llama-{args.llama}"))
    # One epoch over exactly the examples the steps take, so the longest batch the plan assumes is trained.
    train = work / "train.jsonl"
    lines = (ROOT / "examples/data/extract_train.jsonl").read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join(lines[: args.steps * args.batch_size]) + "\n", encoding="utf-8")
    rows = []
    print("| model | method | predicted peak | measured peak | predicted / measured | RSS before build (predicted "
          f"{CPU_RUNTIME_BYTES / 2**20:.0f} MiB) | peak by the end of the load | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        data = config_for(model, method, train, work / method, args.steps, args.batch_size, args.grad_checkpointing)
        cfg = build_config(data)
        checked = check_run(cfg, Console(quiet=True))
        plan = make_plan(cfg, None, checked.device.type, checked.train_set, measure_time=False)
        predicted = plan.methods[cfg.method_name].estimate
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(data)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        measured_bytes = measured["peak_gpu_bytes"] or measured["peak_rss_mb"] * 2**20
        row = {"model": Path(model).name, "method": method, "predicted_bytes": predicted.peak,
               "measured_bytes": measured_bytes, "ratio": predicted.peak / measured_bytes,
               "rss_before_build_mb": measured["rss_before_build_mb"],
               "load_peak_rss_mb": measured["load_peak_rss_mb"], "tokens_per_s": measured["tokens_per_s"],
               "breakdown": {line.name: line.bytes for line in predicted.lines}}
        rows.append(row)
        print(f"| {row['model']} | {method} | {gb(predicted.peak)} | {gb(measured_bytes)} | {row['ratio']:.2f} | "
              f"{measured['rss_before_build_mb']:.0f} MiB | {gb(measured['load_peak_rss_mb'] * 2**20)} | "
              f"{measured['tokens_per_s']:.1f} |", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
