"""Peak memory of loading a model for QLoRA: streamed (slimtune's build) vs load-then-quantize.

Builds a randomly initialised Llama-shaped model of about 1.1B parameters (hidden 2048, 22 layers,
MLP 5632, GQA 32/4 heads, vocab 32000: TinyLlama's shapes), saves it as bf16 safetensors once, then
in fresh processes measures the peak RSS of
- `stream`: `load_quantized_model` (what `method: qlora` builds with): NF4 as each tensor is read;
- `whole`: `load_model` + `quantize_model` (the whole 16-bit model first, as before the stages issue).

    python bench/qlora_load.py [--work-dir DIR] [--json-out R.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = '''
import json, sys, time, torch
from pathlib import Path

def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

from slimtune.models import load_model
from slimtune.models.streaming import load_quantized_model
from slimtune.quant import Linear4bit, quantize_model
from slimtune.train.heap import set_mmap_threshold
model_dir, how = sys.argv[1], sys.argv[2]
set_mmap_threshold(4 * 2**20)  # what the build stage sets on CPU (train.mmap_threshold_mb default)
# A process's peak RSS survives exec on Linux: reset it (VmHWM) to the current RSS before measuring.
Path("/proc/self/clear_refs").write_text("5")
before = rss_mb("VmRSS")
started = time.perf_counter()
if how == "stream":
    model = load_quantized_model(model_dir, torch.bfloat16, torch.device("cpu"), torch.bfloat16)[0]
else:
    model = load_model(model_dir, dtype=torch.bfloat16)[0]
    quantize_model(model, compute_dtype=torch.bfloat16)
seconds = time.perf_counter() - started
peak = rss_mb("VmHWM")
four_bit = sum(m.weight_bytes() for m in model.modules() if isinstance(m, Linear4bit))
dense = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"how": how, "peak_rss_mb": peak, "rss_before_mb": before,
                  "model_mb": (four_bit + dense) / 2**20, "seconds": seconds}))
'''


def make_model(path: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_llama import save_random_llama

    return save_random_llama(path, "1b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "slimtune-bench-1b"))
    parser.add_argument("--json-out")
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(make_model(Path(args.make)))
        return
    path = Path(args.work_dir)
    path.mkdir(parents=True, exist_ok=True)
    # In a child process: building the model here would raise this process's peak, which children inherit.
    made = subprocess.run([sys.executable, __file__, "--make", str(path)], capture_output=True, text=True, check=True)
    params = int(made.stdout.strip().splitlines()[-1])
    results = {"params": params, "bf16_weights_mb": params * 2 / 2**20}
    for how in ("stream", "whole"):
        done = subprocess.run([sys.executable, "-c", MEASURE, str(path), how], capture_output=True, text=True,
                              check=True)
        results[how] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"model: {params / 1e9:.2f}B parameters, {results['bf16_weights_mb']:,.0f} MB in bf16; "
          f"4-bit model {results['stream']['model_mb']:,.0f} MB")
    print("| load | peak RSS MB | RSS before load MB | peak - before | seconds |")
    print("|---|---:|---:|---:|---:|")
    for how, label in (("stream", "streamed NF4 (method: qlora)"), ("whole", "load 16-bit, then quantize")):
        r = results[how]
        print(f"| {label} | {r['peak_rss_mb']:,.0f} | {r['rss_before_mb']:,.0f} | "
              f"{r['peak_rss_mb'] - r['rss_before_mb']:,.0f} | {r['seconds']:.1f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
